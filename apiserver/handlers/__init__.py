"""Thin aiohttp handlers: parse the request, call the registry or the dump streamer, render the answer."""
