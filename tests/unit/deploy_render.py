"""Render a deploy/ kustomization to a list of Kubernetes objects.

The real kustomize (`kustomize build`, or the copy built into `kubectl kustomize`) is used when one
is on PATH. Neither is installable from PyPI or Debian's archive, so a fresh CI machine may lack it;
`render_subset` then renders the part of kustomize these manifests use — `resources`, RFC 6902
`patches` aimed by kind and name, `images` — and tests/unit/test_deploy.py checks that it agrees
with the real one wherever the real one exists. Anything outside that subset is an error, never
silently ignored.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUBSET_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}


def kustomize_command() -> list[str] | None:
    """The command that builds a kustomization on this machine, or None."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_with_kustomize(path: Path) -> list[Obj]:
    command = kustomize_command()
    if command is None:
        raise RuntimeError("neither kustomize nor kubectl is on PATH")
    out = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} {path} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(path: Path) -> list[Obj]:
    """The real kustomize's output when it is installed, else the subset renderer's."""
    return render_with_kustomize(path) if kustomize_command() else render_subset(path)


def render_subset(path: Path) -> list[Obj]:
    kustomization = yaml.safe_load((path / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUBSET_FIELDS
    if unsupported:
        raise ValueError(f"{path}: kustomization fields outside the subset: {sorted(unsupported)}")
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        source = path / entry
        objects += (
            render_subset(source) if source.is_dir() else [d for d in yaml.safe_load_all(source.read_text()) if d]
        )
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
        if key in seen:
            raise ValueError(f"{path}: {key} is defined twice")
        seen.add(key)
    for patch in kustomization.get("patches", []):
        _apply_patch(path, objects, patch)
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def _apply_patch(path: Path, objects: list[Obj], patch: Obj) -> None:
    target = patch.get("target", {})
    if set(target) - {"kind", "name"} or set(patch) - {"target", "patch", "path"}:
        raise ValueError(f"{path}: only patches with target kind/name and patch or path are supported: {patch}")
    ops = yaml.safe_load(patch["patch"] if "patch" in patch else (path / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise ValueError(f"{path}: only RFC 6902 (list of operations) patches are supported")
    matched = [
        o
        for o in objects
        if target.get("kind", o["kind"]) == o["kind"]
        and target.get("name", o["metadata"]["name"]) == o["metadata"]["name"]
    ]
    if not matched:
        raise ValueError(f"{path}: patch target {target} matches nothing")
    for obj in matched:
        for op in ops:
            json_patch(obj, op)


def json_patch(doc: Obj, op: Obj) -> None:
    """One RFC 6902 add / replace / remove operation, in place."""
    kind = op["op"]
    if kind not in ("add", "replace", "remove"):
        raise ValueError(f"unsupported patch operation {kind!r}")
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(op.get("value"))
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, value)
        elif kind == "replace":
            node[index] = value
        else:
            del node[index]
        return
    if kind != "add" and last not in node:
        raise KeyError(f"{op['path']}: nothing to {kind}")
    if kind == "remove":
        del node[last]
    else:
        node[last] = value


def split_image(image: str) -> tuple[str, str]:
    """("registry:5000/name", ":tag" or "@sha256:..." or "")."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _set_image(objects: list[Obj], rule: Obj) -> None:
    if set(rule) - IMAGE_FIELDS:
        raise ValueError(f"unsupported images fields: {sorted(set(rule) - IMAGE_FIELDS)}")
    for container in _containers(objects):
        name, suffix = split_image(container["image"])
        if name != rule["name"]:
            continue
        if "digest" in rule:
            suffix = "@" + rule["digest"]
        elif "newTag" in rule:
            suffix = ":" + str(rule["newTag"])
        container["image"] = rule.get("newName", name) + suffix


def _containers(node: Any) -> list[Obj]:
    """Every container and init container anywhere in the objects."""
    found: list[Obj] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [c for c in value if isinstance(c, dict) and "image" in c]
            else:
                found += _containers(value)
    elif isinstance(node, list):
        for item in node:
            found += _containers(item)
    return found
