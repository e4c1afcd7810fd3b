"""The job runtime that every entry point in jobs/ shares: options declared once, the one shard
engine on Ray, devices and fingerprints, the console and the run report (docs/architecture.md).
Ray lives here and in jobs/, never in pipeline/."""
