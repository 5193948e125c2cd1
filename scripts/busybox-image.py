#!/usr/bin/env python3
"""Builds a one-layer image from Debian's busybox-static as a docker-archive tarball (or an
OCI layout with --oci DIR), for tests on machines without a registry or Docker.

usage: busybox-image.py OUT.tar [--name busybox:test] [--oci DIR]
"""
import argparse, hashlib, io, json, os, tarfile, time

p = argparse.ArgumentParser()
p.add_argument("out", nargs="?")
p.add_argument("--name", default="busybox:test")
p.add_argument("--oci", help="write an OCI layout directory instead")
p.add_argument("--busybox", default="/bin/busybox")
a = p.parse_args()

applets = ["sh", "echo", "sleep", "cat", "ls", "env", "hostname", "wget", "nc", "ip", "ping", "true", "false", "id", "ps", "kill", "mkdir", "rm", "touch", "grep", "head", "tail", "date", "httpd", "test", "seq", "yes", "printf"]
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
    for d in ["bin", "etc", "tmp", "var", "var/www", "root", "proc", "sys", "dev"]:
        ti = tarfile.TarInfo(d); ti.type = tarfile.DIRTYPE; ti.mode = 0o1777 if d == "tmp" else 0o755; ti.mtime = 0
        t.addfile(ti)
    data = open(a.busybox, "rb").read()
    ti = tarfile.TarInfo("bin/busybox"); ti.size = len(data); ti.mode = 0o755; ti.mtime = 0
    t.addfile(ti, io.BytesIO(data))
    for ap in applets:
        ti = tarfile.TarInfo("bin/" + ap); ti.type = tarfile.SYMTYPE; ti.linkname = "busybox"; ti.mtime = 0
        t.addfile(ti)
    for name, body in [("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"), ("etc/group", b"root:x:0:\nnobody:x:65534:\n")]:
        ti = tarfile.TarInfo(name); ti.size = len(body); ti.mode = 0o644; ti.mtime = 0
        t.addfile(ti, io.BytesIO(body))
layer = buf.getvalue()
diff = "sha256:" + hashlib.sha256(layer).hexdigest()
config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
                     "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
                     "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
cfg_hex = hashlib.sha256(config).hexdigest()

if a.oci:
    blobs = os.path.join(a.oci, "blobs", "sha256"); os.makedirs(blobs, exist_ok=True)
    def put(b):
        h = hashlib.sha256(b).hexdigest(); open(os.path.join(blobs, h), "wb").write(b); return "sha256:" + h, len(b)
    ld, ls = put(layer); cd, cs = put(config)
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]}).encode()
    md, ms = put(man)
    open(os.path.join(a.oci, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
    tag = a.name.rsplit(":", 1)[1] if ":" in a.name.rsplit("/", 1)[-1] else "latest"
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
               "annotations": {"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": a.name}}]},
              open(os.path.join(a.oci, "index.json"), "w"))
else:
    with tarfile.open(a.out, "w") as t:
        def add(name, b):
            ti = tarfile.TarInfo(name); ti.size = len(b); ti.mode = 0o644; ti.mtime = int(time.time())
            t.addfile(ti, io.BytesIO(b))
        add(cfg_hex + ".json", config)
        add(diff[7:] + "/layer.tar", layer)
        add("manifest.json", json.dumps([{"Config": cfg_hex + ".json", "RepoTags": [a.name], "Layers": [diff[7:] + "/layer.tar"]}]).encode())
