"""stackwatch.engine: pure numerical code, one module per pipeline stage.

Nothing here does asyncio, HTTP or SQLite, reads configuration or the clock; nothing here imports
stackwatch.daemon or stackwatch.web (a test enforces it).
"""
