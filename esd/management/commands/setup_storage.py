from django.conf import settings
from django.core.management.base import BaseCommand

from esd.storage import S3BlobStore, blob_store

CORS_RULE = {
    "AllowedOrigins": ["*"],
    "AllowedMethods": ["GET", "PUT", "HEAD"],
    "AllowedHeaders": ["*"],
    # Browser uploaders must read each part's ETag to complete a multipart upload.
    "ExposeHeaders": ["ETag"],
    "MaxAgeSeconds": 3600,
}


class Command(BaseCommand):
    help = (
        "Prepare the blob store: in s3 mode create the bucket if missing and set the CORS rule browser uploads "
        "need (ETag exposed); in local mode create the storage folder."
    )

    def handle(self, *args, **options) -> None:
        store = blob_store()
        if not isinstance(store, S3BlobStore):
            self.stdout.write(f"local storage ready at {settings.ESD_VAR_DIR / 'storage' / settings.ESD_BUCKET}")
            return
        client = store.client
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if store.bucket not in existing:
            kwargs = {"Bucket": store.bucket}
            if settings.AWS_REGION != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.AWS_REGION}
            client.create_bucket(**kwargs)
            self.stdout.write(f"created bucket {store.bucket}")
        client.put_bucket_cors(Bucket=store.bucket, CORSConfiguration={"CORSRules": [CORS_RULE]})
        self.stdout.write(f"bucket {store.bucket} ready (CORS exposes ETag)")
