"""Helpers shared by the integration tests: the CLI, the servers' HTTP APIs, the bucket."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs" / "micro.yaml"
ARTIFACTS = ROOT / "test-artifacts"


def gptpipe(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the ``gptpipe`` CLI of this environment; fail the test with its output if it fails."""
    command = [str(Path(sys.executable).parent / "gptpipe"), *args]
    done = subprocess.run(command, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    )
    return done


def http_json(url: str, body: dict | None = None, method: str | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method or ("POST" if data else "GET"), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    return json.loads(text) if text else None


def s3_client(layout):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=layout.s3_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def moto_env(port: int) -> dict[str, str]:
    """The environment that points gptpipe's S3 client (and boto3) at moto on 127.0.0.1:``port``."""
    return {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def moto_bucket(port: int, bucket: str):
    """A boto3 client of moto on ``port`` on which ``bucket`` exists."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    return client
