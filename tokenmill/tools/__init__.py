"""Tool calling: the call syntaxes of model families (formats.py), the request's tools checked
and turned into a constraint (request.py), and the parser that splits a model's output into
content and calls the same way streamed or whole (parser.py)."""
