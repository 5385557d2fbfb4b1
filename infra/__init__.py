"""The local stack (S3 store, MLflow server, Ray head) and the manifests for clusters at scale."""
