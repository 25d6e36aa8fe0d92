"""Create the S3 buckets memel's services write to (idempotent), waiting for the endpoint first.

MLflow does not create its ``--artifacts-destination`` bucket, and Ray Train's checkpoint
storage does not create buckets either. Endpoint from ``MLFLOW_S3_ENDPOINT_URL``, buckets from
``MEMEL_BUCKETS`` (space-separated), keys from the standard AWS variables.
"""

import os
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

WAIT_S = 120.0


def main() -> None:
    """Create every bucket in MEMEL_BUCKETS that does not exist yet."""
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            s3.list_buckets()
            break
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    for bucket in os.environ["MEMEL_BUCKETS"].split():
        try:
            s3.create_bucket(Bucket=bucket)
            print(f"created bucket {bucket}")
        except ClientError as error:
            if error.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            print(f"bucket {bucket} exists")


if __name__ == "__main__":
    main()
