"""Render a kustomization the way `kubectl kustomize` does, for the subset dmlray uses.

    python cluster/render.py k8s/overlays/cpu-smoke     # multi-document YAML on stdout

It exists so the manifests can be checked (schemas, cross-references, entrypoints) on a
machine without kubectl. Supported, with kustomize's semantics:

- `resources`: YAML files (several documents each) and kustomization directories;
- `configMapGenerator` (files, literals, envs; behavior create/merge/replace) with
  `generatorOptions` labels/annotations. Names must be unhashed
  (`disableNameSuffixHash: true`): kustomize would not rewrite a hashed name inside the
  pod templates of RayCluster/RayJob, which it has no schema for;
- `patches` (path or inline; target by group/version/kind/name, names as regexes):
  a YAML list is a JSON6902 patch (add, remove, replace, test, move, copy), a mapping a
  strategic-merge patch, of which only the unambiguous part is supported: nested
  mappings, `null` deletes a key, `$patch: delete` deletes the resource. A list in a
  strategic-merge patch is an error: kustomize merges lists of custom resources by
  guessed keys, so such patches are written as JSON6902 here;
- `namespace`, and `labels` (metadata only: includeSelectors/includeTemplates false).

Anything else in a kustomization is an error rather than silently ignored. Files are
loaded only from inside the kustomization's own folder, as kustomize's default load
restrictor demands.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "generatorOptions",
    "configMapGenerator",
    "patches",
}
# Kinds this renderer leaves without a namespace (cluster-scoped).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
}


class RenderError(ValueError):
    """The kustomization uses something this renderer does not support, or is wrong."""


# ----------------------------------------------------------------------------- loading


def _kustomization_file(folder: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (folder / name).is_file():
            return folder / name
    raise RenderError(f"{folder}: no kustomization.yaml")


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if root.resolve() != path and root.resolve() not in path.parents:
        raise RenderError(f"{root}: {rel!r} is outside the kustomization folder (kustomize refuses it)")
    return path


def _load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
    return docs


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


# -------------------------------------------------------------------------- generators


def _env_file(path: Path) -> dict[str, str]:
    data = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise RenderError(f"{path}:{n}: expected KEY=VALUE")
        key, value = line.split("=", 1)
        data[key] = value
    return data


def _configmap(root: Path, spec: dict, options: dict) -> dict:
    unknown = set(spec) - {"name", "behavior", "files", "literals", "envs", "options"}
    if unknown:
        raise RenderError(f"{root}: configMapGenerator fields not supported: {sorted(unknown)}")
    opts = {**options, **spec.get("options", {})}
    if not opts.get("disableNameSuffixHash"):
        raise RenderError(
            f"{root}: ConfigMap {spec['name']!r} needs disableNameSuffixHash: true "
            "(hashed names are not rewritten inside RayCluster/RayJob)"
        )
    data: dict[str, str] = {}
    for env in spec.get("envs", []):
        data.update(_env_file(_inside(root, env)))
    for literal in spec.get("literals", []):
        key, value = literal.split("=", 1)
        data[key] = value
    for entry in spec.get("files", []):
        key, _, rel = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = _inside(root, rel)
        data[key or path.name] = path.read_text()
    meta: dict[str, Any] = {"name": spec["name"]}
    if opts.get("labels"):
        meta["labels"] = dict(opts["labels"])
    if opts.get("annotations"):
        meta["annotations"] = dict(opts["annotations"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _apply_generator(resources: list[dict], generated: dict, behavior: str, root: Path) -> None:
    key = _key(generated)
    existing = [r for r in resources if _key(r) == key]
    if behavior == "create":
        if existing:
            raise RenderError(f"{root}: ConfigMap {key[1]!r} already exists; use behavior merge or replace")
        resources.append(generated)
        return
    if behavior not in ("merge", "replace"):
        raise RenderError(f"{root}: unknown generator behavior {behavior!r}")
    if not existing:
        raise RenderError(f"{root}: ConfigMap {key[1]!r} to {behavior} does not exist in the resources")
    target = existing[0]
    if behavior == "replace":
        target["data"] = generated["data"]
    else:
        target.setdefault("data", {}).update(generated["data"])
    for field in ("labels", "annotations"):
        if generated["metadata"].get(field):
            target["metadata"].setdefault(field, {}).update(generated["metadata"][field])


# ----------------------------------------------------------------------------- patches


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, dict):
            if part not in node:
                raise RenderError(f"JSON6902: {path!r} does not exist")
            node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RenderError(f"JSON6902: {path!r} does not exist")
            node = node[int(part)]
        else:
            raise RenderError(f"JSON6902: {path!r} goes through a scalar")
    return node


def _remove(parent: Any, last: str, kind: str, path: str) -> Any:
    """Take ``parent[last]`` out (a JSON6902 remove); ``kind`` and ``path`` name the op in errors."""
    if isinstance(parent, dict):
        if last not in parent:
            raise RenderError(f"JSON6902 {kind}: {path!r} does not exist")
        return parent.pop(last)
    if not last.isdigit() or int(last) >= len(parent):
        raise RenderError(f"JSON6902 {kind}: {path!r} does not exist")
    return parent.pop(int(last))


def _add(into: Any, at: str, value: Any, kind: str, path: str) -> None:
    """Put a copy of ``value`` at ``into[at]`` (a JSON6902 add: ``-`` appends to a list)."""
    if isinstance(into, dict):
        into[at] = copy.deepcopy(value)
    elif at == "-":
        into.append(copy.deepcopy(value))
    elif at.isdigit() and int(at) <= len(into):
        into.insert(int(at), copy.deepcopy(value))
    else:
        raise RenderError(f"JSON6902 {kind}: bad list index in {path!r}")


def _json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = str(op.get("op")), str(op.get("path", ""))
        parts = _pointer(path)
        if not parts:
            raise RenderError("JSON6902: whole-document operations are not supported")
        parent, last = _walk(doc, parts[:-1], path), parts[-1]
        if kind == "add":
            _add(parent, last, op["value"], kind, path)
        elif kind == "remove":
            _remove(parent, last, kind, path)
        elif kind == "replace":
            _remove(parent, last, kind, path)
            _add(parent, last, op["value"], kind, path)
        elif kind == "test":
            if _walk(doc, parts, path) != op["value"]:
                raise RenderError(f"JSON6902 test failed at {path!r}: {_walk(doc, parts, path)!r} != {op['value']!r}")
        elif kind in ("move", "copy"):
            src_parts = _pointer(op["from"])
            value = _walk(doc, src_parts, op["from"])
            if kind == "move":
                src_parent = _walk(doc, src_parts[:-1], op["from"])
                if isinstance(src_parent, dict):
                    src_parent.pop(src_parts[-1])
                else:
                    src_parent.pop(int(src_parts[-1]))
            _add(parent, last, value, kind, path)
        else:
            raise RenderError(f"JSON6902: unknown op {kind!r}")
    return doc


def _merge(base: Any, patch: Any, where: str) -> Any:
    if not isinstance(patch, dict):
        if isinstance(patch, list):
            raise RenderError(f"strategic-merge patch sets a list at {where}: write it as a JSON6902 patch")
        return copy.deepcopy(patch)
    if not isinstance(base, dict):
        base = {}
    out = dict(base)
    for key, value in patch.items():
        if key.startswith("$"):
            raise RenderError(f"strategic-merge directive {key!r} at {where} is not supported")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(base.get(key), value, f"{where}.{key}")
    return out


def _matches(obj: dict, target: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise RenderError(f"patch target fields not supported: {sorted(unknown)}")
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace", ""),
    }
    return all(re.fullmatch(str(pattern), checks[field]) for field, pattern in target.items())


def _apply_patch(resources: list[dict], spec: dict, root: Path) -> list[dict]:
    unknown = set(spec) - {"path", "patch", "target"}
    if unknown:
        raise RenderError(f"{root}: patch fields not supported: {sorted(unknown)}")
    text = _inside(root, spec["path"]).read_text() if "path" in spec else spec["patch"]
    body = yaml.safe_load(text)
    target = spec.get("target")
    if isinstance(body, list):
        if not target:
            raise RenderError(f"{root}: a JSON6902 patch needs a target")
        hits = [r for r in resources if _matches(r, target)]
        if not hits:
            raise RenderError(f"{root}: patch target {target} matches nothing")
        return [_json6902(r, body) if _matches(r, target) else r for r in resources]
    if not isinstance(body, dict):
        raise RenderError(f"{root}: a patch must be a list (JSON6902) or a mapping (strategic merge)")
    if not target:
        target = {"kind": body["kind"], "name": re.escape(body["metadata"]["name"])}
    hits = [r for r in resources if _matches(r, target)]
    if not hits:
        raise RenderError(f"{root}: patch target {target} matches nothing")
    if body.get("$patch") == "delete":
        return [r for r in resources if not _matches(r, target)]
    body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
    if "metadata" in body:
        body["metadata"] = {k: v for k, v in body["metadata"].items() if k != "name"} or None
        if body["metadata"] is None:
            body.pop("metadata")
    return [_merge(r, body, f"{r['kind']}/{r['metadata']['name']}") if _matches(r, target) else r for r in resources]


# ------------------------------------------------------------------------------ render


def render(folder: str | Path) -> list[dict]:
    """The resources of a kustomization folder, fully transformed."""
    root = Path(folder)
    kfile = _kustomization_file(root)
    kust = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(kust) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{kfile}: fields not supported here: {sorted(unknown)}")

    resources: list[dict] = []
    for entry in kust.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(_load_docs(_inside(root, entry)))

    options = kust.get("generatorOptions", {})
    unknown = set(options) - {"disableNameSuffixHash", "labels", "annotations"}
    if unknown:
        raise RenderError(f"{kfile}: generatorOptions not supported: {sorted(unknown)}")
    for spec in kust.get("configMapGenerator", []):
        _apply_generator(resources, _configmap(root, spec, options), spec.get("behavior", "create"), root)

    for spec in kust.get("patches", []):
        resources = _apply_patch(resources, spec, root)

    if "namespace" in kust:
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = kust["namespace"]

    for entry in kust.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise RenderError(f"{kfile}: labels with includeSelectors/includeTemplates are not supported")
        for r in resources:
            r["metadata"].setdefault("labels", {}).update(entry.get("pairs", {}))

    seen: set[tuple[str, str, str]] = set()
    for r in resources:
        ident = (r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"])
        if ident in seen:
            raise RenderError(f"{kfile}: duplicate resource {ident}")
        seen.add(ident)
    return resources


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python cluster/render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(args[0]), sys.stdout, sort_keys=False, width=1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
