"""The error Engine.load and its backend adapters raise for a user's engine, request or machine."""


class EngineError(ValueError):
    pass
