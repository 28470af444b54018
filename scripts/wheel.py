#!/usr/bin/env python3
"""Pack the Python package the build tree holds (BUILD/python/kvferry: the extension, built for
the interpreter running this script, and the pure-Python files) into a wheel in OUT_DIR:

    /usr/bin/python3 scripts/wheel.py build/python dist      (what `make wheel` runs)

A wheel is a zip file with a fixed layout (PEP 427, PEP 376 RECORD), written here with the
standard library alone, so nothing beyond the build is needed, offline. Its tag is the running
interpreter's (cp311-cp311-linux_x86_64), so `pip install dist/kvferry-*.whl` works in any
CPython of that version on this platform: a venv, pyenv's, conda's. The extension links
libkvferry statically; it needs only libc and libjansson at run time.
"""

import base64
import hashlib
import os
import sys
import sysconfig
import zipfile


def main(pkg_root, out_dir):
    pkg = os.path.join(pkg_root, "kvferry")
    sys.path.insert(0, pkg_root)
    import kvferry  # the module being packed, so its version and tag are the built ones

    if os.path.dirname(os.path.abspath(kvferry.__file__)) != os.path.abspath(pkg):
        sys.exit("wheel: imported %s, not the build's %s" % (kvferry.__file__, pkg))
    version = kvferry.__version__
    impl = "cp%d%d" % sys.version_info[:2]
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    tag = "%s-%s-%s" % (impl, impl, plat)
    dist_info = "kvferry-%s.dist-info" % version
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "kvferry-%s-%s.whl" % (version, tag))

    files = []
    for name in sorted(os.listdir(pkg)):
        if name.endswith((".py", ".pyi", ".so")) or name == "py.typed":
            with open(os.path.join(pkg, name), "rb") as f:
                files.append(("kvferry/" + name, f.read()))
    # The drop-in packages (python3 -m kvferry compat-path), kept inside kvferry/.
    for root, dirs, names in sorted(os.walk(os.path.join(pkg, "compat"))):
        dirs.sort()
        for name in sorted(n for n in names if n.endswith(".py")):
            rel = os.path.relpath(os.path.join(root, name), pkg)
            with open(os.path.join(root, name), "rb") as f:
                files.append(("kvferry/" + rel.replace(os.sep, "/"), f.read()))
    if not any(n.endswith(".so") for n, _ in files):
        sys.exit("wheel: no extension module in %s; build first (make build)" % pkg)
    meta = ("Metadata-Version: 2.1\nName: kvferry\nVersion: %s\n"
            "Summary: Transfer engine for disaggregated LLM inference (mf_adapter-compatible API)\n"
            "Requires-Python: ==%d.%d.*\n" % ((version,) + sys.version_info[:2]))
    wheel = ("Wheel-Version: 1.0\nGenerator: kvferry scripts/wheel.py\nRoot-Is-Purelib: false\n"
             "Tag: %s\n" % tag)
    files += [(dist_info + "/METADATA", meta.encode()), (dist_info + "/WHEEL", wheel.encode()),
              (dist_info + "/top_level.txt", b"kvferry\n")]
    record = []
    for name, data in files:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (name, digest, len(data)))
    record.append(dist_info + "/RECORD,,")
    files.append((dist_info + "/RECORD", ("\n".join(record) + "\n").encode()))

    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    os.replace(tmp, path)
    print(path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
