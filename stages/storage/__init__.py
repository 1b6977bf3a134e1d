"""Where bytes live: content-keyed artifacts, local and S3 stores, corpus readers, token shards."""
