"""The shared core: pure functions and small classes every stage builds on; no module here runs a stage."""
