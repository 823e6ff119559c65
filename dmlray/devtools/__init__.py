"""Development and demo helpers, not needed in production: a local SeaweedFS S3 server
and free loopback ports."""
