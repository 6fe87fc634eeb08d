"""Pulling records from upstream HTTP APIs: `python -m records_service import SOURCE_FILE`.

source (the TOML file) -> paging and fetch (pages of JSON) -> paths and mapping (items to
records) -> the store (one transaction per page, with the source's progress) -> run (the loop).
"""
