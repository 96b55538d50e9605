"""Talking to an S3-compatible object store: SigV4-signed requests over Twisted's
HTTP client (`client`), multipart uploads (`upload`), and calling both from threads
that block (`reactor`).

A utility, not a stage: the S3 mail store (`mta.storage.s3store`) and the
PostgreSQL queue's S3 bodies (`mta.queue`) both use it, and it imports neither.
"""
