"""boto3 peer of the dataset-download benchmark: every object under a prefix
to a local directory, with the same concurrency as VTP's BlobStore.

Prints {"seconds": ..., "objects": ..., "bytes": ...}.
"""
import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.config import Config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["VTP_TEST_S3_ENDPOINT"],
        region_name=os.environ.get("VTP_TEST_S3_REGION", "garage"),
        aws_access_key_id=os.environ["VTP_TEST_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["VTP_TEST_S3_SECRET_ACCESS_KEY"],
        config=Config(max_pool_connections=args.concurrency, s3={"addressing_style": "path"}),
    )
    start = time.perf_counter()
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix + "/"):
        keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]

    def fetch(item):
        key, _ = item
        target = Path(args.out) / key[len(args.prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(args.bucket, key, str(target))

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(fetch, keys))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "objects": len(keys), "bytes": sum(s for _, s in keys)}))


if __name__ == "__main__":
    main()
