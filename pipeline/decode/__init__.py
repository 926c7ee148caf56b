"""The decode stage: item rows in (a video, a document), one row per window / page out.

    stage.py          the Ray Data stage (`DecodeUnits`) and the job's decoder factory (`make_decoder`)
    supervisor.py     the decoder run in a killable child process: hangs and crashes cost one item
    child.py          the child process itself
    wire.py           rows over the socket pair: a JSON header plus raw array bytes
    shared_memory.py  big arrays through reused memfd slots
    video.py          frame-exact video decode (decord or PyAV)
    windows.py        which frames each video window samples, fitted to the model's context
    documents.py      PDF pages and images rendered with PyMuPDF / Pillow
    files.py          inputs as local files (remote objects fetched by the worker), `DecodeError`

The fault drills that test the supervisor are in `pipeline/faults.py`.
"""
