"""Running the app under uvicorn: its configuration, and the protocol subclasses that build on
uvicorn's and websockets' internals (fenced here, pinned to the tested versions)."""
