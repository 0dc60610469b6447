"""Storage: everything that reads or writes a run root (local or s3://).

- `storage`: tables as Parquet parts (atomic writes, exactly-once keys), JSON and bytes files;
- `manifest`: each table's committed parts and keys, checked on read;
- `leases`: one writer per table (heartbeats, expiry, the commit lock);
- `atomic_files`: atomic create / compare-and-swap on local and S3 filesystems;
- `errors`: what the three raise; `verify`: `nearid verify ROOT`.
"""
