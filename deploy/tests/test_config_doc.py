"""docs/configuration.md is what deploy/gen-config-doc.sh makes from the binary's --help:
a flag added, removed or changed without regenerating the page fails here."""

from __future__ import annotations

import re
import subprocess

from deploylib import IAMLET, ROOT

DOC = ROOT / "docs" / "configuration.md"


def test_configuration_doc_is_current():
    r = subprocess.run([str(ROOT / "deploy" / "gen-config-doc.sh"), "--check"],
                       env={"PATH": "/usr/bin:/bin", "BINARY": str(IAMLET)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr


def test_every_flag_and_variable_is_listed():
    """Independent of the generator: every --flag and IAMLET_* variable in --help is on the page."""
    help_text = subprocess.run([str(IAMLET), "--help"], env={"PATH": "/usr/bin:/bin"},
                               capture_output=True, text=True, check=True).stdout
    doc = DOC.read_text()
    flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", help_text, re.M))
    envs = set(re.findall(r"\[env: (IAMLET_[A-Z0-9_]+)", help_text))
    assert len(flags) > 40 and len(envs) > 40
    for f in flags:
        assert f"`{f}" in doc, f
    for e in envs:
        assert f"`{e}`" in doc, e
