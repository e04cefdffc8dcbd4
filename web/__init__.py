"""stackwatch.web: the aiohttp application (JSON API, WebSocket, previews) and the static page."""
