"""engram-recovery: backup and disaster recovery for Engram, as an MCP server."""

__version__ = "0.1.0"
