"""A client generated from openapi.yaml by openapi-python-client, used against a real daemon.

Usage: generated_client.py PACKAGE_PARENT BASE_URL TOKEN

PACKAGE_PARENT holds the generated package `sandboxd_client`. The script creates a sandbox
without starting it, uploads an archive into it, starts it, lists it, waits for it, follows its
logs, downloads an archive of what it wrote, and deletes it, all through the generated code only:
a shape the contract describes wrongly fails here (an unparsed answer, a missing field).
"""

import io
import sys
import tarfile

sys.path.insert(0, sys.argv[1])
base_url, token = sys.argv[2], sys.argv[3]

from sandboxd_client import AuthenticatedClient  # noqa: E402
from sandboxd_client.api.default import (  # noqa: E402
    create_sandbox,
    delete_sandbox,
    get_archive,
    get_logs,
    get_sandbox,
    get_version,
    list_sandboxes,
    put_archive,
    start_sandbox,
    wait_sandbox,
)
from sandboxd_client.models import CreateSandbox, ErrorBody, Sandbox, SandboxState  # noqa: E402
from sandboxd_client.models.wait_sandbox_condition import WaitSandboxCondition  # noqa: E402
from sandboxd_client.types import File  # noqa: E402


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


client = AuthenticatedClient(base_url=base_url, token=token, raise_on_unexpected_status=True)

version = get_version.sync(client=client)
check(version is not None and version.version, f"version: {version!r}")

script = "cat /work/in/hello.txt; echo to-stderr >&2; mkdir -p /work/out; echo result > /work/out/r.txt"
created = create_sandbox.sync_detailed(
    client=client,
    body=CreateSandbox.from_dict(
        {"command": ["sh", "-c", script], "start": False, "labels": {"from": "python"}}
    ),
)
check(created.status_code == 201, f"create: {created.status_code} {created.content!r}")
sandbox = created.parsed
check(isinstance(sandbox, Sandbox), f"create parsed: {sandbox!r}")
check(sandbox.state == SandboxState.CREATED, f"state {sandbox.state}")
check(created.headers.get("location") == f"/v1/sandboxes/{sandbox.id}", f"{created.headers}")
check(created.headers.get("x-request-id"), "no x-request-id")
sid = str(sandbox.id)

upload = io.BytesIO()
with tarfile.open(fileobj=upload, mode="w") as tar:
    data = b"hello from python\n"
    info = tarfile.TarInfo("in/hello.txt")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
put = put_archive.sync_detailed(
    sid, client=client, path="/work", body=File(payload=io.BytesIO(upload.getvalue()))
)
check(put.status_code == 204, f"put_archive: {put.status_code} {put.content!r}")

started = start_sandbox.sync(sid, client=client)
check(isinstance(started, Sandbox), f"start: {started!r}")

listed = list_sandboxes.sync(client=client, label=["from=python"])
check([str(s.id) for s in listed.items] == [sid], f"list: {listed!r}")

done = wait_sandbox.sync(sid, client=client, condition=WaitSandboxCondition.EXITED, timeout=60)
check(isinstance(done, Sandbox), f"wait: {done!r}")
check(done.state == SandboxState.EXITED and done.exit_code == 0, f"ended {done.state} {done.exit_code}")

logs = get_logs.sync(sid, client=client, follow=True)
out = logs.payload.read()
check(out == b"hello from python\nto-stderr\n", f"logs: {out!r}")

archive = get_archive.sync(sid, client=client, path="/work/out")
with tarfile.open(fileobj=io.BytesIO(archive.payload.read())) as tar:
    names = sorted(tar.getnames())
    content = tar.extractfile("r.txt").read()
check("r.txt" in names and content == b"result\n", f"archive: {names} {content!r}")

gone = delete_sandbox.sync_detailed(sid, client=client)
check(gone.status_code == 204, f"delete: {gone.status_code}")
client = AuthenticatedClient(base_url=base_url, token=token)
missing = get_sandbox.sync(sid, client=client)
check(isinstance(missing, ErrorBody) and missing.error.code == "not_found", f"after delete: {missing!r}")
check(missing.error.request_id, "no request_id in the error body")
print("generated client: ok")
