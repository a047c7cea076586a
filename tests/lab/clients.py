"""Client programs the tests run inside the lab (python -c SOURCE ARGS...)."""
from __future__ import annotations

# Shared by the programs below: read one whole response (the head, then Content-Length
# bytes), so that the next request on the connection starts on a clean stream; the body is
# returned.
READ_RESPONSE = r"""
def read_response(f):
    length = 0
    while True:
        line = f.readline()
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        if line in (b"\r\n", b""):
            break
    return f.read(length)
"""

# A keep-alive client: one request, then waits for a line on stdin, then two more on the same
# connection (for "the agent started after the connection was opened" tests).
KEEPALIVE_CLIENT = READ_RESPONSE + r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 80))
f = s.makefile("rb")
def get(path):
    s.sendall(("GET %s HTTP/1.1\r\nHost: k\r\n\r\n" % path).encode())
    read_response(f)
get("/latest/meta-data/instance-id")
print("first", flush=True)
sys.stdin.readline()
get("/latest/meta-data/ami-id")
get("/latest/meta-data/hostname")
print("done", flush=True)
"""


# --------------------------------------------------------------------------- real SDKs
# Released SDKs, installed once into a cache outside the checkout (pip --target / npm), run
# inside the lab's namespace against the fake IMDS. Each reads instance credentials the way
# an application does (the SDK's own credential provider), so the requests on the wire --
# token PUT or not, User-Agent, fallback -- are the SDK's, not ours.
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

CLIENT_CACHE = Path(os.environ.get("IMDS_TRACER_CLIENT_CACHE",
                                   "/var/cache/imds-tracer-lab/clients"))
# botocore 1.12 imports collections.Mapping (gone in 3.10): it needs an older interpreter
OLD_PYTHONS = ("/root/.pyenv/versions/3.8.18/bin/python3.8",
               "/root/.pyenv/versions/3.9.18/bin/python3.9", "python3.9", "python3.8")

BOTOCORE_CREDENTIALS = r"""
import botocore, botocore.session
s = botocore.session.get_session()
c = s.get_credentials()
assert c is not None and c.method == "iam-role", c and c.method
print(botocore.__version__, c.method, c.get_frozen_credentials().access_key[:4])
"""

AWS_SDK_JS_V2 = r"""
const AWS = require("aws-sdk");
const creds = new AWS.EC2MetadataCredentials({httpOptions: {timeout: 2000}, maxRetries: 0});
creds.get((err) => {
  if (err) { console.error(String(err)); process.exit(1); }
  console.log(AWS.VERSION, creds.accessKeyId.slice(0, 4));
});
"""

AWS_SDK_JS_V3 = r"""
const { fromInstanceMetadata } = require("@aws-sdk/credential-provider-imds");
fromInstanceMetadata({timeout: 2000, maxRetries: 0})().then(
  (c) => console.log("v3", c.accessKeyId.slice(0, 4)),
  (e) => { console.error(String(e)); process.exit(1); });
"""

ALIBABA_CREDENTIALS = r"""
from alibabacloud_credentials.client import Client
from alibabacloud_credentials.models import Config
c = Client(Config(type="ecs_ram_role", role_name="lab-ram-role"))
print(c.get_credential().access_key_id[:4])
"""

# name -> (package manager, packages, cache directory)
SDK_PACKAGES = {
    "botocore-1.12.253": ("pip", ["botocore==1.12.253", "python-dateutil==2.8.2",
                                  "jmespath==0.10.0", "six", "urllib3==1.25.11",
                                  "docutils==0.15.2"]),
    "botocore-current": ("pip", ["botocore"]),
    # 2.500.0 (July 2019) predates IMDSv2 (November 2019); 2.600.0 already sends a token PUT
    "aws-sdk-js-2.500.0": ("npm", ["aws-sdk@2.500.0"]),
    "aws-sdk-js-2-current": ("npm", ["aws-sdk@2"]),
    "aws-sdk-js-v3": ("npm", ["@aws-sdk/credential-provider-imds@3"]),
    "alibabacloud-credentials": ("pip", ["alibabacloud_credentials"]),
    "alibabacloud-credentials-0.3.6": ("pip", ["alibabacloud_credentials==0.3.6"]),
}


def old_python() -> str | None:
    for name in OLD_PYTHONS:
        found = shutil.which(name)
        if found and subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
            return found  # (a pyenv shim of a version not selected exists but fails)
    return None


def install_sdk(name: str) -> Path:
    """The cache directory of one SDK, installed on first use (PyPI / npm). Raises
    RuntimeError with the reason when it cannot be installed (e.g. no network)."""
    manager, packages = SDK_PACKAGES[name]
    target = CLIENT_CACHE / name
    marker = target / ".installed"
    if marker.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    if manager == "pip":
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target)]
        if name == "botocore-1.12.253":
            argv.append("--no-deps")
        argv += packages
    else:
        argv = ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                str(target), *packages]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot install {name}: {proc.stderr.strip()[-300:]}")
    marker.touch()
    return target


def sdk_command(name: str) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that makes SDK `name` read instance credentials once."""
    target = install_sdk(name)
    # no credentials anywhere else: the SDK's chain must reach the instance metadata
    env = {"HOME": str(target), "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_DEFAULT_REGION": "us-east-1",
           "PYTHONPATH": str(target), "NODE_PATH": str(target / "node_modules")}
    if name.startswith("botocore"):
        python = old_python() if name == "botocore-1.12.253" else sys.executable
        if python is None:
            raise RuntimeError("botocore 1.12 needs Python <= 3.9: none found")
        return [python, "-c", BOTOCORE_CREDENTIALS], env
    if name.startswith("alibabacloud-credentials"):
        return [sys.executable, "-c", ALIBABA_CREDENTIALS], env
    return ["node", "-e", AWS_SDK_JS_V3 if name == "aws-sdk-js-v3" else AWS_SDK_JS_V2], env
