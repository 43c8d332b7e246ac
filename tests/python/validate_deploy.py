#!/usr/bin/env python3
"""Validates the Kubernetes deployment in deploy/ without a cluster.

1. Renders every kustomization under deploy/ (the base and each overlay) with the small
   renderer below. It implements exactly the kustomize features deploy/ uses -- resources
   (files and directories), namespace, labels (pairs, includeTemplates), images,
   configMapGenerator / secretGenerator (files, literals; behavior create / replace / merge;
   only with disableNameSuffixHash), and patches that are strategic-merge patches selected by
   kind and name -- and fails loudly on anything else.
2. Where kubectl is installed, renders them again with `kubectl kustomize` and requires the
   same objects (order of the object list aside), so the renderer is checked against the real
   thing. Without kubectl that comparison is skipped, with a note.
3. Validates every rendered object with kubernetes-validate in strict mode (no unknown field)
   against the bundled schemas of the Kubernetes versions in KUBE_VERSIONS.
4. Checks what the schemas cannot: the security rules (non-root, no privilege, no escalation,
   read-only root filesystem, resource requests), the coordinator's gRPC probes, the workers'
   Indexed Job and its recovery policy, GPU requests in the GPU overlay and none in the CPU
   demo, references to ConfigMaps / Secrets / volumes, the wiring between the job's
   configuration and the manifests (ports, endpoint, token files, worker counts), the
   configuration keys (against configs/pretrain.yaml, which spells out every compiled
   default) and the binaries' flags (against their clap definitions), and that the images
   built by deploy/Dockerfile hold the binaries the manifests run.

Run: bash scripts/validate-deploy.sh (or make validate-deploy). Exit status 1 on any problem.
"""

from __future__ import annotations

import base64
import copy
import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The oldest Kubernetes these manifests support (podReplacementPolicy and backoffLimitPerIndex
# of Jobs are GA from 1.34) and a recent one. Override: ALBEF_KUBE_VERSIONS=1.34,1.36
KUBE_VERSIONS = [v.strip() for v in os.environ.get("ALBEF_KUBE_VERSIONS", "1.34,1.35").split(",") if v.strip()]

# What each kustomization must be. `external`: objects it references but does not contain
# (created out of band, deploy/README.md); `gpu`: GPU workers expected (True) or forbidden.
PROFILES = {
    "base": {
        "external": {("Secret", "albef-tokens")},
        "gpu": False,
    },
    "overlays/cpu-demo": {
        "external": set(),
        "gpu": False,
        "config": {
            "train.device": "cpu",
            "model.preset": "albef-small",
            "job.collective_backend": "tcp",
        },
        "workers": 2,
    },
    "overlays/gpu": {
        "external": {("Secret", "albef-tokens")},
        "gpu": True,
        "config": {
            "train.device": "cuda",
            "model.preset": "albef-base",
            "job.collective_backend": "nccl",
        },
        "remote_run_dir": True,
        # Out-of-band Secrets whose shape this file shows (validated too).
        "secret_examples": "overlays/gpu/secrets.example.yaml",
    },
}

# Configuration keys the manifests use that configs/pretrain.yaml does not spell out (yet):
# they must exist in the binaries (reported as a note while pretrain.yaml lacks them).
ASSUMED_CONFIG_KEYS = {"worker.metrics_listen"}
# Flags the manifests pass that the binaries' clap definitions do not show (yet).
ASSUMED_FLAGS = {"albef-worker": {"--collective-advertise"}}

# Where each binary's flags are defined (clap derive): its main.rs, plus ConfigArgs when
# flattened in.
BINARY_SOURCES = {
    "albef-coordinator": ROOT / "services/albef-coordinator/src/main.rs",
    "albef-worker": ROOT / "services/albef-worker/src/main.rs",
}
CONFIG_ARGS_SOURCE = ROOT / "crates/albef-config/src/cli.rs"

# The Dockerfile target that builds each image (by the image name's last path component).
IMAGE_STAGES = {"albef-coordinator": "coordinator", "albef-worker": "worker"}
BINARIES = ("albef-coordinator", "albef-worker", "albefctl", "albef")


class RenderError(Exception):
    """A kustomization the renderer cannot render (an unimplemented feature, a bad reference)."""


# ------------------------------------------------------------------------------------------
# The renderer
# ------------------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "namespace", "labels", "images",
    "configMapGenerator", "secretGenerator", "generatorOptions", "patches",
}
NAMESPACED_KINDS = {
    "ConfigMap", "Secret", "Service", "ServiceAccount", "Deployment", "Job", "PersistentVolumeClaim",
}
CLUSTER_KINDS = {"Namespace"}
# Kinds whose spec.template is a pod template (labels' includeTemplates, images).
TEMPLATE_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet", "ReplicaSet"}
# Strategic merge: lists merged element by element on this key (Kubernetes' patchMergeKey).
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "volumes": "name",
    "volumeMounts": "mountPath", "env": "name",
}
# Lists a strategic-merge patch replaces whole (no patch strategy in Kubernetes' schema).
REPLACE_LISTS = {"args", "command", "tolerations", "drop", "add", "accessModes"}


def load_docs(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise RenderError(f"{rel(path)}: not YAML: {e}") from e
    for d in docs:
        if not isinstance(d, dict):
            raise RenderError(f"{rel(path)}: a document is not a mapping")
    return docs


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def ident(obj: dict) -> tuple[str, str, str, str]:
    md = obj.get("metadata") or {}
    return (obj.get("apiVersion", ""), obj.get("kind", ""), md.get("namespace", ""), md.get("name", ""))


def show(obj: dict) -> str:
    _, kind, ns, name = ident(obj)
    return f"{kind}/{ns + '/' if ns else ''}{name}"


def inside(kdir: Path, relpath: str, what: str) -> Path:
    """A file of a kustomization: kustomize's load restrictor keeps them under its directory."""
    if "://" in relpath:
        raise RenderError(f"{rel(kdir)}: {what} {relpath!r}: remote files are not implemented")
    p = (kdir / relpath).resolve()
    if kdir != p and kdir not in p.parents:
        raise RenderError(f"{rel(kdir)}: {what} {relpath!r} lies outside the kustomization directory")
    if not p.is_file():
        raise RenderError(f"{rel(kdir)}: {what} {relpath!r} does not exist")
    return p


def render(kdir: Path, chain: tuple[Path, ...] = ()) -> list[dict]:
    kdir = kdir.resolve()
    if kdir in chain:
        raise RenderError(f"{rel(kdir)}: kustomization cycle")
    for alt in ("kustomization.yml", "Kustomization"):
        if (kdir / alt).exists():
            raise RenderError(f"{rel(kdir)}: only kustomization.yaml is implemented, found {alt}")
    kfile = kdir / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{rel(kdir)}: no kustomization.yaml")
    docs = load_docs(kfile)
    if len(docs) != 1:
        raise RenderError(f"{rel(kfile)}: expected one document")
    k = docs[0]
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise RenderError(f"{rel(kfile)}: kustomize features not implemented by this renderer: {sorted(unknown)}")
    if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
        raise RenderError(f"{rel(kfile)}: expected apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization")

    objs: list[dict] = []
    for r in k.get("resources") or []:
        if "://" in r or r.startswith("github.com/"):
            raise RenderError(f"{rel(kfile)}: remote resource {r!r} not implemented")
        p = (kdir / r).resolve()
        if p.is_dir():
            objs += render(p, chain + (kdir,))
        else:
            objs += load_docs(inside(kdir, r, "resource"))
    for o in objs:
        for field in ("apiVersion", "kind"):
            if not o.get(field):
                raise RenderError(f"{rel(kdir)}: an object without {field}")
        if not (o.get("metadata") or {}).get("name"):
            raise RenderError(f"{rel(kdir)}: a {o['kind']} without metadata.name")
    check_unique(objs, kdir)

    generators = [("ConfigMap", g) for g in k.get("configMapGenerator") or []]
    generators += [("Secret", g) for g in k.get("secretGenerator") or []]
    options = k.get("generatorOptions") or {}
    if set(options) - {"disableNameSuffixHash"}:
        raise RenderError(f"{rel(kfile)}: generatorOptions {sorted(set(options) - {'disableNameSuffixHash'})} not implemented")
    if generators and options.get("disableNameSuffixHash") is not True:
        raise RenderError(
            f"{rel(kfile)}: generated names with a hash suffix (and the rewriting of the references to "
            "them) are not implemented: set generatorOptions.disableNameSuffixHash: true"
        )
    for kind, g in generators:
        generate(kind, g, kdir, objs)

    for p in k.get("patches") or []:
        apply_patch(p, kdir, objs)

    namespace = k.get("namespace")
    if namespace is not None:
        for o in objs:
            if o["kind"] in CLUSTER_KINDS:
                continue
            if o["kind"] not in NAMESPACED_KINDS:
                raise RenderError(f"{rel(kfile)}: namespace: is the kind {o['kind']} namespaced? (not implemented)")
            o["metadata"]["namespace"] = namespace
        check_unique(objs, kdir)

    for entry in k.get("labels") or []:
        apply_labels(entry, kfile, objs)
    for image in k.get("images") or []:
        apply_image(image, kfile, objs)
    return objs


def check_unique(objs: list[dict], kdir: Path) -> None:
    seen = set()
    for o in objs:
        i = ident(o)
        if i in seen:
            raise RenderError(f"{rel(kdir)}: {show(o)} defined twice")
        seen.add(i)


def generate(kind: str, g: dict, kdir: Path, objs: list[dict]) -> None:
    allowed = {"name", "namespace", "behavior", "files", "literals"} | ({"type"} if kind == "Secret" else set())
    if set(g) - allowed:
        raise RenderError(f"{rel(kdir)}: {kind} generator fields not implemented: {sorted(set(g) - allowed)}")
    name = g.get("name")
    if not name:
        raise RenderError(f"{rel(kdir)}: {kind} generator without a name")
    data: dict[str, str] = {}
    for f in g.get("files") or []:
        key, path = f.split("=", 1) if "=" in f else (Path(f).name, f)
        text = inside(kdir, path, f"{kind} generator file").read_bytes()
        try:
            data_add(data, key, text.decode("utf-8"), kdir)
        except UnicodeDecodeError as e:
            raise RenderError(f"{rel(kdir)}: {path}: binary data is not implemented") from e
    for lit in g.get("literals") or []:
        key, sep, value = lit.partition("=")
        if not sep:
            raise RenderError(f"{rel(kdir)}: literal {lit!r}: expected KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            raise RenderError(f"{rel(kdir)}: literal {key}: quoted values (kustomize unquotes them) not implemented")
        data_add(data, key, value, kdir)
    new: dict = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
    if g.get("namespace"):
        new["metadata"]["namespace"] = g["namespace"]
    if kind == "Secret":
        new["type"] = g.get("type", "Opaque")
        new["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        new["data"] = data

    behavior = g.get("behavior", "create")
    matches = [
        i for i, o in enumerate(objs)
        if o["kind"] == kind and o["metadata"]["name"] == name
        and o["metadata"].get("namespace", "") == new["metadata"].get("namespace", "")
    ]
    if behavior == "create":
        if matches:
            raise RenderError(f"{rel(kdir)}: {kind}/{name} generated but already defined (behavior: create)")
        objs.append(new)
        return
    if behavior not in ("replace", "merge"):
        raise RenderError(f"{rel(kdir)}: generator behavior {behavior!r} unknown")
    if len(matches) != 1:
        raise RenderError(f"{rel(kdir)}: {kind}/{name} behavior {behavior}: nothing to {behavior}")
    old = objs[matches[0]]
    md = new["metadata"]
    for field in ("labels", "annotations"):
        merged = {**(old["metadata"].get(field) or {}), **(md.get(field) or {})}
        if merged:
            md[field] = merged
    md["name"] = old["metadata"]["name"]
    if old["metadata"].get("namespace"):
        md["namespace"] = old["metadata"]["namespace"]
    if behavior == "merge":
        new["data"] = {**(old.get("data") or {}), **new["data"]}
    objs[matches[0]] = new


def data_add(data: dict, key: str, value: str, kdir: Path) -> None:
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", key):
        raise RenderError(f"{rel(kdir)}: invalid data key {key!r}")
    if key in data:
        raise RenderError(f"{rel(kdir)}: data key {key!r} given twice")
    data[key] = value


def apply_patch(p: dict, kdir: Path, objs: list[dict]) -> None:
    if not isinstance(p, dict) or set(p) - {"path", "patch"} or len(p) != 1:
        raise RenderError(
            f"{rel(kdir)}: patches entry {p!r}: only a lone path: or patch: (a strategic-merge patch "
            "naming its target by kind and name) is implemented, no target:/options:"
        )
    if "path" in p:
        where = rel(inside(kdir, p["path"], "patch"))
        text = (kdir / p["path"]).read_text()
    else:
        where, text = f"{rel(kdir)} (inline patch)", p["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if not docs:
        raise RenderError(f"{where}: empty patch")
    for doc in docs:
        if not isinstance(doc, dict):
            raise RenderError(f"{where}: JSON6902 patches (lists of operations) are not implemented")
        md = doc.get("metadata") or {}
        if not doc.get("apiVersion") or not doc.get("kind") or not md.get("name"):
            raise RenderError(f"{where}: a strategic-merge patch needs apiVersion, kind and metadata.name")
        targets = [
            o for o in objs
            if o["apiVersion"] == doc["apiVersion"] and o["kind"] == doc["kind"]
            and o["metadata"]["name"] == md["name"]
            and ("namespace" not in md or o["metadata"].get("namespace") == md["namespace"])
        ]
        if len(targets) != 1:
            raise RenderError(f"{where}: the patch of {doc['kind']}/{md['name']} matches {len(targets)} objects")
        strategic_merge(targets[0], doc, where, [])


def strategic_merge(dest: dict, patch: dict, where: str, path: list[str]) -> None:
    for key, value in patch.items():
        here = path + [str(key)]
        if isinstance(key, str) and key.startswith("$"):
            raise RenderError(f"{where}: patch directive {'.'.join(here)} not implemented")
        if value is None:
            dest.pop(key, None)
        elif key not in dest:
            check_no_directives(value, where, here)
            dest[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(dest[key], dict):
            strategic_merge(dest[key], value, where, here)
        elif isinstance(value, list) and isinstance(dest[key], list):
            if key in MERGE_KEYS:
                dest[key] = merge_list(dest[key], value, MERGE_KEYS[key], where, here)
            elif key in REPLACE_LISTS:
                check_no_directives(value, where, here)
                dest[key] = copy.deepcopy(value)
            else:
                raise RenderError(f"{where}: merging the list {'.'.join(here)} is not implemented")
        elif isinstance(value, (dict, list)) or isinstance(dest[key], (dict, list)):
            raise RenderError(f"{where}: {'.'.join(here)}: the patch changes the type of the field")
        else:
            dest[key] = value


def merge_list(dest: list, patch: list, mkey: str, where: str, path: list[str]) -> list:
    """kustomize (kyaml, list increase direction 'prepend'): the patch's elements first, in the
    patch's order, each merged into its namesake; then the elements only the target has."""
    by_key = {}
    for item in dest:
        if not isinstance(item, dict) or mkey not in item:
            raise RenderError(f"{where}: {'.'.join(path)}: an element without {mkey}")
        by_key[item[mkey]] = item
    out, used = [], set()
    for item in patch:
        if not isinstance(item, dict) or mkey not in item:
            raise RenderError(f"{where}: {'.'.join(path)}: a patch element without {mkey}")
        if item[mkey] in used:
            raise RenderError(f"{where}: {'.'.join(path)}: {mkey} {item[mkey]!r} twice in the patch")
        used.add(item[mkey])
        if item[mkey] in by_key:
            merged = copy.deepcopy(by_key[item[mkey]])
            strategic_merge(merged, item, where, path + [str(item[mkey])])
            out.append(merged)
        else:
            check_no_directives(item, where, path)
            out.append(copy.deepcopy(item))
    out += [copy.deepcopy(i) for i in dest if i[mkey] not in used]
    return out


def check_no_directives(value, where: str, path: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and k.startswith("$"):
                raise RenderError(f"{where}: patch directive {'.'.join(path + [k])} not implemented")
            check_no_directives(v, where, path + [str(k)])
    elif isinstance(value, list):
        for v in value:
            check_no_directives(v, where, path)


def apply_labels(entry: dict, kfile: Path, objs: list[dict]) -> None:
    if set(entry) - {"pairs", "includeSelectors", "includeTemplates"}:
        raise RenderError(f"{rel(kfile)}: labels fields not implemented: {sorted(set(entry) - {'pairs', 'includeSelectors', 'includeTemplates'})}")
    if entry.get("includeSelectors"):
        raise RenderError(f"{rel(kfile)}: labels.includeSelectors is not implemented")
    pairs = entry.get("pairs") or {}
    for o in objs:
        o["metadata"].setdefault("labels", {}).update(pairs)
        if entry.get("includeTemplates") and o["kind"] in TEMPLATE_KINDS:
            tmd = o.setdefault("spec", {}).setdefault("template", {}).setdefault("metadata", {})
            tmd.setdefault("labels", {}).update(pairs)


def split_image(image: str) -> tuple[str, str]:
    """'reg:5000/a/b:tag' -> ('reg:5000/a/b', ':tag'); digests -> ('...', '@sha256:...')."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def apply_image(image: dict, kfile: Path, objs: list[dict]) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"} or "name" not in image:
        raise RenderError(f"{rel(kfile)}: images entry {image!r} not implemented")
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        for c in containers(spec):
            name, suffix = split_image(c.get("image", ""))
            if name != image["name"]:
                continue
            if image.get("digest"):
                suffix = "@" + image["digest"]
            elif image.get("newTag") is not None:
                suffix = ":" + str(image["newTag"])
            c["image"] = image.get("newName", name) + suffix


def pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") in TEMPLATE_KINDS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec")
    if obj.get("kind") == "Pod":
        return obj.get("spec")
    if obj.get("kind") == "CronJob":
        raise RenderError("CronJob pod templates are not implemented")
    return None


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.notes: list[str] = []

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.errors.append(message)
        return ok

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)


def compare_with_kubectl(name: str, kdir: Path, ours: list[dict], report: Report) -> str:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        report.note("kubectl not found: the renderer was not compared with `kubectl kustomize`")
        return "skipped (no kubectl here)"
    try:
        out = subprocess.run(
            [kubectl, "kustomize", str(kdir)], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        report.check(False, f"{name}: kubectl kustomize timed out")
        return "failed"
    if out.returncode != 0:
        report.check(False, f"{name}: kubectl kustomize failed: {out.stderr.strip()}")
        return "failed"
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    a = {ident(o): o for o in ours}
    b = {ident(o): o for o in theirs}
    ok = report.check(
        set(a) == set(b),
        f"{name}: objects differ from kubectl kustomize: only ours {sorted(set(a) - set(b))}, "
        f"only kubectl's {sorted(set(b) - set(a))}",
    )
    for i in sorted(set(a) & set(b)):
        if a[i] != b[i]:
            ok = False
            diff = "\n".join(
                difflib.unified_diff(
                    yaml.safe_dump(b[i], sort_keys=True).splitlines(),
                    yaml.safe_dump(a[i], sort_keys=True).splitlines(),
                    "kubectl kustomize", "validate_deploy.py", lineterm="",
                )
            )
            report.check(False, f"{name}: {show(a[i])} differs from kubectl kustomize:\n{diff}")
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, check=False)
    kustomize = re.search(r"Kustomize Version: (\S+)", version.stdout)
    return ("identical" if ok else "DIFFERENT") + f" (kubectl kustomize, kustomize {kustomize.group(1) if kustomize else '?'})"


def validate_schemas(name: str, objs: list[dict], report: Report) -> None:
    for o in objs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                report.check(False, f"{name}: {show(o)} is invalid for Kubernetes {version}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                report.check(False, f"{name}: {show(o)}: {e.message}")


def config_tree() -> dict:
    return yaml.safe_load((ROOT / "configs/pretrain.yaml").read_text())


def key_known(tree: dict, key: str) -> bool:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(leaves(v, key + "."))
        else:
            out[key] = v
    return out


def check_key(tree: dict, key: str, where: str, report: Report) -> None:
    if key_known(tree, key):
        return
    if key in ASSUMED_CONFIG_KEYS:
        report.note(f"configuration key {key} is not in configs/pretrain.yaml yet: the binaries must accept it")
        return
    report.check(False, f"{where}: unknown configuration key {key} (not in configs/pretrain.yaml)")


def clap_flags(source: Path) -> set[str]:
    """The long flags of a clap-derive struct: `#[arg(long ...)] field` -> --field (or long = "x")."""
    flags, pending = set(), None
    for line in source.read_text().splitlines():
        s = line.strip()
        m = re.match(r"#\[arg\((.*)\)\]", s)
        if m and re.search(r"\blong\b", m.group(1)):
            explicit = re.search(r'\blong\s*=\s*"([^"]+)"', m.group(1))
            pending = explicit.group(1) if explicit else ""
            continue
        if pending is not None:
            f = re.match(r"(?:pub\s+)?([a-z_][a-z0-9_]*)\s*:", s)
            if f:
                flags.add("--" + (pending or f.group(1).replace("_", "-")))
                pending = None
    return flags


def binary_flags(binary: str) -> set[str] | None:
    src = BINARY_SOURCES.get(binary)
    if src is None or not src.exists():
        return None
    flags = clap_flags(src)
    if "#[command(flatten)]" in src.read_text() and "ConfigArgs" in src.read_text():
        flags |= clap_flags(CONFIG_ARGS_SOURCE)
    return flags


def parse_args(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """--flag value / --flag=value pairs (every flag the manifests pass takes a value)."""
    flags: dict[str, list[str]] = {}
    loose = []
    it = iter(args)
    for a in it:
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            if not eq:
                value = next(it, None)
            flags.setdefault(name, []).append(value)
        else:
            loose.append(a)
    return flags, loose


def port_of(address: str) -> int | None:
    m = re.search(r":(\d+)$", address or "")
    return int(m.group(1)) if m else None


def quantity_gib(q) -> float:
    """A Kubernetes memory quantity ("16Gi", "512Mi", "1G", bytes) in GiB; 0 when absent."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q or "").strip())
    if not m:
        return 0.0
    unit = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(m.group(1)) * unit[m.group(2)] / 2**30


def effective_config(base: dict, container: dict, sets: list[str], tree: dict, where: str, report: Report) -> dict:
    """The configuration a container sees: file < ALBEF__ variables < --set."""
    cfg = dict(base)
    for e in container.get("env") or []:
        if e["name"].startswith("ALBEF__"):
            key = ".".join(e["name"][len("ALBEF__"):].lower().split("__"))
            check_key(tree, key, f"{where} env {e['name']}", report)
            if "value" in e:
                cfg[key] = e["value"]
    for kv in sets:
        key, sep, value = (kv or "").partition("=")
        report.check(bool(sep), f"{where}: --set {kv!r}: expected key=value")
        check_key(tree, key.strip(), f"{where} --set", report)
        cfg[key.strip()] = value.strip()
    return cfg


def check_kustomization(name: str, objs: list[dict], report: Report) -> dict:
    """The checks the schemas cannot make. Returns a few facts for the summary."""
    profile = PROFILES[name]
    tree = config_tree()
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    namespaces = {o["metadata"].get("namespace", "") for o in objs if o["kind"] not in CLUSTER_KINDS}
    report.check(len(namespaces) == 1, f"{name}: objects in several namespaces: {sorted(namespaces)}")
    for ns in by_kind.get("Namespace", {}).values():
        report.check(
            (ns["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce") == "restricted",
            f"{name}: {show(ns)} must enforce the restricted Pod Security profile",
        )

    def exists(kind: str, obj_name: str) -> bool:
        return obj_name in by_kind.get(kind, {}) or (kind, obj_name) in profile["external"]

    # The job's configuration.
    cm = by_kind.get("ConfigMap", {}).get("albef-config")
    file_cfg: dict = {}
    if report.check(cm is not None and "albef.yaml" in (cm.get("data") or {}), f"{name}: no ConfigMap albef-config with albef.yaml"):
        parsed = yaml.safe_load(cm["data"]["albef.yaml"]) or {}
        file_cfg = leaves(parsed)
        for key in file_cfg:
            check_key(tree, key, f"{name} albef.yaml", report)
    defaults = leaves(tree)
    base_cfg = {**defaults, **file_cfg}

    workloads = [o for o in objs if pod_spec(o) is not None]
    report.check(
        {o["kind"] for o in workloads} <= {"Deployment", "Job"},
        f"{name}: unexpected workload kinds {sorted({o['kind'] for o in workloads})}",
    )
    uids = set()
    facts: dict = {}
    for w in workloads:
        where = f"{name}: {show(w)}"
        spec = pod_spec(w)
        tmeta = w["spec"]["template"].get("metadata") or {}
        sc = spec.get("securityContext") or {}
        report.check(sc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot must be true")
        report.check(isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, f"{where}: pod runAsUser must be a non-root uid")
        uids.add(sc.get("runAsUser"))
        report.check((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile RuntimeDefault expected")
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            report.check(not spec.get(field), f"{where}: {field} must not be set")
        report.check(spec.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken must be false")
        report.check(spec.get("enableServiceLinks") is False, f"{where}: enableServiceLinks must be false (ALBEF_* service variables)")
        sa = spec.get("serviceAccountName")
        report.check(sa is None or exists("ServiceAccount", sa), f"{where}: ServiceAccount {sa} not defined")

        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for v in volumes.values():
            report.check("hostPath" not in v, f"{where}: hostPath volume {v['name']}")
            if "configMap" in v:
                report.check(exists("ConfigMap", v["configMap"]["name"]) or v["configMap"].get("optional"), f"{where}: volume {v['name']}: ConfigMap {v['configMap']['name']} not defined")
            if "secret" in v:
                sname = v["secret"]["secretName"]
                report.check(exists("Secret", sname) or v["secret"].get("optional"), f"{where}: volume {v['name']}: Secret {sname} not defined")
                secret = by_kind.get("Secret", {}).get(sname)
                if secret is not None:
                    keys = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
                    for item in v["secret"].get("items") or []:
                        report.check(item["key"] in keys, f"{where}: Secret {sname} has no key {item['key']}")
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                report.check(exists("PersistentVolumeClaim", claim), f"{where}: PersistentVolumeClaim {claim} not defined")

        for c in containers(spec):
            cwhere = f"{where} container {c['name']}"
            csc = c.get("securityContext") or {}
            report.check(csc.get("allowPrivilegeEscalation") is False, f"{cwhere}: allowPrivilegeEscalation must be false")
            report.check(csc.get("privileged") is not True, f"{cwhere}: privileged")
            report.check(csc.get("readOnlyRootFilesystem") is True, f"{cwhere}: readOnlyRootFilesystem must be true")
            caps = csc.get("capabilities") or {}
            report.check("ALL" in (caps.get("drop") or []), f"{cwhere}: capabilities must drop ALL")
            report.check(not caps.get("add"), f"{cwhere}: capabilities added")
            report.check(csc.get("runAsNonRoot", True) is True and csc.get("runAsUser", 1) != 0, f"{cwhere}: runs as root")
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            report.check("cpu" in requests and "memory" in requests, f"{cwhere}: resources.requests needs cpu and memory")
            report.check("memory" in limits, f"{cwhere}: resources.limits needs memory")
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
            for m in mounts.values():
                report.check(m["name"] in volumes, f"{cwhere}: volumeMount {m['mountPath']} names no volume ({m['name']})")
            tmp = mounts.get("/tmp")
            report.check(
                tmp is not None and "emptyDir" in volumes.get(tmp["name"], {}),
                f"{cwhere}: a read-only root filesystem needs an emptyDir at /tmp",
            )
            env_names = {e["name"] for e in c.get("env") or []}
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in ref:
                        report.check(exists(kind, ref[key]["name"]) or ref[key].get("optional"), f"{cwhere}: env {e['name']}: {kind} {ref[key]['name']} not defined")
            for ef in c.get("envFrom") or []:
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in ef:
                        report.check(exists(kind, ef[key]["name"]) or ef[key].get("optional"), f"{cwhere}: envFrom: {kind} {ef[key]['name']} not defined")
            # Kubernetes leaves an undefined $(VAR) in args as literal text.
            for arg in (c.get("command") or []) + (c.get("args") or []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    report.check(var in env_names, f"{cwhere}: $({var}) is not a variable of the container")
            gpu = any("nvidia.com/gpu" in (res.get(k) or {}) for k in ("requests", "limits"))
            if not profile["gpu"]:
                report.check(not gpu, f"{cwhere}: requests GPUs in a CPU kustomization")

        ports = {p["name"]: p["containerPort"] for c in spec.get("containers") or [] for p in c.get("ports") or [] if "name" in p}
        annotations = tmeta.get("annotations") or {}
        if annotations.get("prometheus.io/scrape") == "true":
            report.check(
                str(annotations.get("prometheus.io/port")) == str(ports.get("metrics")),
                f"{where}: prometheus.io/port {annotations.get('prometheus.io/port')} is not the metrics port {ports.get('metrics')}",
            )

        if w["kind"] == "Deployment" and w["metadata"]["name"] == "albef-coordinator":
            check_coordinator(name, w, spec, ports, volumes, base_cfg, tree, by_kind, report)
        elif w["kind"] == "Job" and w["metadata"]["name"] == "albef-worker":
            facts = check_workers(name, w, spec, ports, volumes, base_cfg, tree, by_kind, profile, report)
        else:
            report.check(False, f"{where}: unexpected workload")
    report.check(len(uids) == 1, f"{name}: pods run as different uids {sorted(map(str, uids))}")
    report.check("albef-coordinator" in by_kind.get("Deployment", {}), f"{name}: no Deployment albef-coordinator")
    report.check("albef-worker" in by_kind.get("Job", {}), f"{name}: no Job albef-worker")

    for key, want in (profile.get("config") or {}).items():
        report.check(str(base_cfg.get(key)) == want, f"{name}: {key} is {base_cfg.get(key)!r}, expected {want!r}")
    if profile.get("remote_run_dir"):
        for key in ("job.run_dir",):
            report.check(str(base_cfg.get(key, "")).startswith(("s3://", "gs://", "az://")), f"{name}: {key} must be in object storage (s3://, gs://, az://)")
        for pattern in base_cfg.get("data.train_file") or []:
            report.check(pattern.startswith(("s3://", "gs://", "az://")), f"{name}: data.train_file {pattern} must be in object storage")
    return {"uid": next(iter(uids)) if len(uids) == 1 else None, **facts}


def container(spec: dict, cname: str) -> dict:
    for c in spec.get("containers") or []:
        if c["name"] == cname:
            return c
    return {}


def mounted_file(c: dict, volumes: dict, path: str, kind: str) -> str | None:
    """The (volume source name, key) a file path comes from, when it lies in a mounted
    ConfigMap or Secret volume."""
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/") + "/"
        if path.startswith(mp) and not m.get("subPath"):
            v = volumes.get(m["name"], {})
            src = v.get("configMap") if kind == "ConfigMap" else v.get("secret")
            if src is None:
                return None
            key = path[len(mp):]
            items = src.get("items")
            if items is not None:
                key = next((i["key"] for i in items if i["path"] == key), None)
            return key
    return None


def check_token_file(where: str, c: dict, volumes: dict, path: str, by_kind: dict, report: Report) -> None:
    key = mounted_file(c, volumes, path, "Secret")
    if not report.check(key is not None, f"{where}: token file {path} is not in a mounted Secret"):
        return
    for m in c.get("volumeMounts") or []:
        secret = volumes.get(m["name"], {}).get("secret")
        if secret and path.startswith(m["mountPath"].rstrip("/") + "/"):
            rendered = by_kind.get("Secret", {}).get(secret["secretName"])
            if rendered is not None:
                keys = set(rendered.get("data") or {}) | set(rendered.get("stringData") or {})
                report.check(key in keys, f"{where}: token file {path}: Secret {secret['secretName']} has no key {key}")


def check_coordinator(name, w, spec, ports, volumes, base_cfg, tree, by_kind, report) -> None:
    where = f"{name}: {show(w)}"
    report.check(w["spec"].get("replicas", 1) == 1, f"{where}: exactly one replica")
    report.check((w["spec"].get("strategy") or {}).get("type") == "Recreate", f"{where}: strategy Recreate (never two coordinators)")
    labels = (w["spec"]["template"].get("metadata") or {}).get("labels") or {}
    selector = (w["spec"].get("selector") or {}).get("matchLabels") or {}
    report.check(selector.items() <= labels.items(), f"{where}: selector does not match the pod labels")
    c = container(spec, "coordinator")
    if not report.check(bool(c), f"{where}: no container named coordinator"):
        return
    report.check((c.get("command") or [""])[0] == "albef-coordinator", f"{where}: runs {c.get('command')}, not albef-coordinator")
    flags, loose = parse_args(c.get("args") or [])
    check_flags(where, "albef-coordinator", flags, loose, report)
    cfg = effective_config(base_cfg, c, flags.get("--set", []), tree, where, report)
    grpc = ports.get("grpc")
    report.check(grpc is not None and port_of(cfg.get("coordinator.listen")) == grpc, f"{where}: coordinator.listen {cfg.get('coordinator.listen')} does not listen on the grpc port {grpc}")
    report.check(str(cfg.get("coordinator.listen", "")).startswith("0.0.0.0:"), f"{where}: coordinator.listen must bind every interface")
    report.check(port_of(cfg.get("coordinator.metrics_listen")) == ports.get("metrics"), f"{where}: coordinator.metrics_listen {cfg.get('coordinator.metrics_listen')!r} is not the metrics port")
    for probe in ("readinessProbe", "livenessProbe"):
        p = c.get(probe) or {}
        report.check("grpc" in p and p["grpc"].get("port") == grpc, f"{where}: {probe} must be a gRPC probe on port {grpc}")
    if c.get("startupProbe"):
        report.check(c["startupProbe"].get("grpc", {}).get("port") == grpc, f"{where}: startupProbe must be a gRPC probe on port {grpc}")
    for key in ("coordinator.worker_token_file", "coordinator.admin_token_file"):
        report.check(bool(cfg.get(key)), f"{where}: {key} unset: authentication would be off")
        if cfg.get(key):
            check_token_file(where, c, volumes, cfg[key], by_kind, report)
    check_config_mount(where, c, volumes, flags, report)
    svc = by_kind.get("Service", {}).get("albef-coordinator")
    if report.check(svc is not None, f"{name}: no Service albef-coordinator"):
        sel = svc["spec"].get("selector") or {}
        report.check(bool(sel) and sel.items() <= labels.items(), f"{name}: Service albef-coordinator does not select the coordinator pod")
        sports = {p["name"]: p for p in svc["spec"].get("ports") or []}
        for pname in ("grpc", "metrics"):
            sp = sports.get(pname)
            report.check(sp is not None and sp.get("targetPort") in (pname, ports.get(pname)), f"{name}: Service albef-coordinator must expose the {pname} port")


def check_config_mount(where: str, c: dict, volumes: dict, flags: dict, report: Report) -> None:
    paths = flags.get("--config") or []
    if report.check(len(paths) == 1, f"{where}: expected one --config"):
        key = mounted_file(c, volumes, paths[0], "ConfigMap")
        report.check(key == "albef.yaml", f"{where}: --config {paths[0]} is not albef.yaml of a mounted ConfigMap")


def check_flags(where: str, binary: str, flags: dict, loose: list, report: Report) -> None:
    report.check(not loose, f"{where}: stray arguments {loose}")
    known = binary_flags(binary)
    if known is None:
        report.check(False, f"{where}: cannot read the flags of {binary}")
        return
    for f in flags:
        if f in known:
            continue
        if f in ASSUMED_FLAGS.get(binary, set()):
            report.note(f"flag {f} of {binary} is not in its clap definition yet: the binary must accept it")
        else:
            report.check(False, f"{where}: {binary} has no flag {f}")


def check_workers(name, w, spec, ports, volumes, base_cfg, tree, by_kind, profile, report) -> dict:
    where = f"{name}: {show(w)}"
    js = w["spec"]
    report.check(js.get("completionMode") == "Indexed", f"{where}: completionMode must be Indexed (one pod per rank)")
    n = js.get("completions")
    report.check(isinstance(n, int) and n >= 1 and js.get("parallelism") == n, f"{where}: completions and parallelism must be equal (one pod per rank)")
    restart = spec.get("restartPolicy")
    if restart == "Never":
        report.check(
            (js.get("backoffLimitPerIndex") or 0) >= 1 or (js.get("backoffLimit") or 0) >= 1,
            f"{where}: restartPolicy Never without retries: a failed worker would never come back",
        )
    else:
        report.check(restart == "OnFailure", f"{where}: restartPolicy must be OnFailure or Never (with retries)")
    if js.get("podFailurePolicy"):
        report.check(restart == "Never", f"{where}: podFailurePolicy needs restartPolicy Never")
        report.check(js.get("podReplacementPolicy") in (None, "Failed"), f"{where}: podFailurePolicy needs podReplacementPolicy Failed")
    if "backoffLimitPerIndex" in js:
        report.check(restart == "Never", f"{where}: backoffLimitPerIndex needs restartPolicy Never")
    if profile.get("workers"):
        report.check(n == profile["workers"], f"{where}: {n} workers, expected {profile['workers']}")

    c = container(spec, "worker")
    if not report.check(bool(c), f"{where}: no container named worker"):
        return {}
    report.check((c.get("command") or [""])[0] == "albef-worker", f"{where}: runs {c.get('command')}, not albef-worker")
    flags, loose = parse_args(c.get("args") or [])
    check_flags(where, "albef-worker", flags, loose, report)
    cfg = effective_config(base_cfg, c, flags.get("--set", []), tree, where, report)
    # A pod with local ranks (albef-worker --local-ranks, worker.local_ranks) is a node of that
    # many ranks, one per GPU; `auto` is the pod's GPU count.
    res = c.get("resources") or {}
    gpus = [(res.get(k) or {}).get("nvidia.com/gpu") for k in ("requests", "limits")]
    local = str((flags.get("--local-ranks") or [cfg.get("worker.local_ranks", "1")])[0]).strip()
    per_pod = int(gpus[1] or 1) if local == "auto" else int(local) if local.isdigit() else 0
    report.check(per_pod >= 1, f"{where}: worker.local_ranks {local!r} is neither auto nor a count")
    if gpus[1] is not None and per_pod > 1:
        report.check(per_pod == int(gpus[1]), f"{where}: {per_pod} local ranks on {gpus[1]} GPUs: one rank per GPU")
    ranks = (n or 0) * per_pod
    lo, hi = int(cfg.get("job.min_workers", 1)), int(cfg.get("job.max_workers", 1))
    report.check(lo <= ranks <= hi, f"{where}: {n} pods x {per_pod} local ranks = {ranks} ranks outside job.min_workers..max_workers = {lo}..{hi}")

    env = {e["name"]: e for e in c.get("env") or []}
    field = lambda v: ((env.get(v) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")  # noqa: E731
    wid = (flags.get("--worker-id") or [""])[0]
    stable = {v for v in re.findall(r"\$\((\w+)\)", wid)}
    report.check(
        bool(stable) and all(
            field(v) in ("metadata.name", "metadata.annotations['batch.kubernetes.io/job-completion-index']",
                         "metadata.labels['batch.kubernetes.io/job-completion-index']")
            for v in stable
        ),
        f"{where}: --worker-id {wid!r} must derive from the completion index (or the pod name)",
    )
    listen = (flags.get("--collective-listen") or [""])[0]
    advertise = (flags.get("--collective-advertise") or [""])[0]
    report.check(listen.startswith("0.0.0.0:"), f"{where}: --collective-listen must bind every interface")
    report.check(port_of(listen) == ports.get("collective") == port_of(advertise), f"{where}: collective ports disagree (listen, advertise, container port)")
    ip_vars = re.findall(r"\$\((\w+)\)", advertise)
    report.check(len(ip_vars) == 1 and field(ip_vars[0]) == "status.podIP", f"{where}: --collective-advertise must use the pod IP (downward API status.podIP)")
    report.check(port_of(cfg.get("worker.metrics_listen")) == ports.get("metrics"), f"{where}: worker.metrics_listen is not the metrics port")

    svc_name = "albef-coordinator"
    svc = by_kind.get("Service", {}).get(svc_name)
    grpc_port = next((p["port"] for p in (svc or {}).get("spec", {}).get("ports", []) if p.get("name") == "grpc"), None)
    endpoint = str(cfg.get("coordinator.endpoint", ""))
    report.check(
        re.fullmatch(rf"https?://{svc_name}(\.[a-z0-9.-]+)?:{grpc_port}", endpoint) is not None,
        f"{where}: coordinator.endpoint {endpoint!r} is not the Service {svc_name}:{grpc_port}",
    )
    token = cfg.get("coordinator.worker_token_file")
    if report.check(bool(token), f"{where}: coordinator.worker_token_file unset"):
        check_token_file(where, c, volumes, token, by_kind, report)
    for m in c.get("volumeMounts") or []:
        v = volumes.get(m["name"], {})
        if "secret" in v and mounted_file(c, volumes, m["mountPath"].rstrip("/") + "/admin-token", "Secret") == "admin-token":
            report.check(False, f"{where}: the workers must not see the admin token")
    check_config_mount(where, c, volumes, flags, report)

    headless = by_kind.get("Service", {}).get(spec.get("subdomain", ""))
    labels = (w["spec"]["template"].get("metadata") or {}).get("labels") or {}
    if spec.get("subdomain"):
        report.check(
            headless is not None and headless["spec"].get("clusterIP") == "None"
            and (headless["spec"].get("selector") or {}).items() <= labels.items(),
            f"{where}: subdomain {spec['subdomain']} needs a headless Service selecting the workers",
        )

    facts = {"workers": n, "gpus": gpus[1], "ranks": ranks}
    if profile["gpu"]:
        report.check(gpus[1] is not None and int(gpus[1]) >= 1, f"{where}: nvidia.com/gpu limit expected")
        report.check(gpus[0] is not None and gpus[0] == gpus[1], f"{where}: nvidia.com/gpu requests must be set, equal to the limits")
        shm = next((m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"), None)
        shm_dir = (volumes.get(shm["name"], {}).get("emptyDir") or {}) if shm else {}
        report.check(shm_dir.get("medium") == "Memory", f"{where}: /dev/shm must be a memory emptyDir")
        # NCCL's intra-node transport and the loaders of every local rank share it.
        report.check(
            quantity_gib(shm_dir.get("sizeLimit")) >= 2 * per_pod,
            f"{where}: /dev/shm sizeLimit {shm_dir.get('sizeLimit')} is under 2 GiB per local rank",
        )
        nccl_env = {e["name"] for e in c.get("env") or [] if e["name"].startswith("NCCL_")}
        report.check({"NCCL_SOCKET_IFNAME", "NCCL_DEBUG"} <= nccl_env, f"{where}: set NCCL_SOCKET_IFNAME and NCCL_DEBUG (got {sorted(nccl_env)})")
        report.check(any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations") or []), f"{where}: tolerate the nvidia.com/gpu taint")
        report.check(bool(spec.get("nodeSelector") or spec.get("affinity")), f"{where}: select GPU nodes")
    return facts


def check_secret_examples(name: str, path: Path, render_ns: str, report: Report) -> int:
    docs = load_docs(path)
    validate_schemas(f"{name} {path.name}", docs, report)
    names = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret"}
    tokens = names.get("albef-tokens")
    report.check(
        tokens is not None and {"worker-token", "admin-token"} <= set(tokens.get("stringData") or {}) | set(tokens.get("data") or {}),
        f"{rel(path)}: Secret albef-tokens with worker-token and admin-token expected",
    )
    for d in docs:
        report.check(d["metadata"].get("namespace") == render_ns, f"{rel(path)}: {show(d)} not in the overlay's namespace {render_ns}")
    return len(docs)


def dockerfile_stages() -> dict[str, dict]:
    """FROM ... AS stage -> {'binaries': {...}, 'user': '...'} from deploy/Dockerfile."""
    stages: dict[str, dict] = {}
    current = None
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", s, re.IGNORECASE)
        if m:
            current = stages.setdefault((m.group(1) or "").lower(), {"binaries": set(), "user": None})
            continue
        if current is None:
            continue
        if re.match(r"COPY\s", s, re.IGNORECASE):
            words = s.split()
            current["binaries"] |= {Path(w).name for w in words[1:-1] if Path(w).name in BINARIES}
        m = re.match(r"USER\s+(\S+)", s, re.IGNORECASE)
        if m:
            current["user"] = m.group(1)
    return stages


def check_images(name: str, objs: list[dict], uid, report: Report) -> None:
    stages = dockerfile_stages()
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        for c in containers(spec):
            image, _ = split_image(c.get("image", ""))
            stage = IMAGE_STAGES.get(image.rsplit("/", 1)[-1])
            if not report.check(stage in stages, f"{name}: {show(o)} {c['name']}: image {c.get('image')} is built by no deploy/Dockerfile target"):
                continue
            have = stages[stage]["binaries"]
            cmd = c.get("command") or []
            used = set()
            if cmd[:2] == ["sh", "-c"]:
                used = set(re.findall(r"(?:^|[\s;|&(])(albef(?:-worker|-coordinator|ctl)?)(?=\s)", " ".join(cmd[2:]) + " "))
            elif cmd:
                used = {cmd[0]}
            report.check(bool(cmd), f"{name}: {show(o)} {c['name']}: set command (the binary) explicitly")
            for b in used:
                report.check(b in have, f"{name}: {show(o)} {c['name']}: runs {b}, which the {stage} image lacks (has {sorted(have)})")
            user = (stages[stage]["user"] or "").split(":")[0]
            report.check(user == str(uid), f"{name}: the {stage} image's USER {user} is not the pods' runAsUser {uid}")


def main() -> int:
    report = Report()
    found = sorted(str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml"))
    if set(found) != set(PROFILES):
        print(f"FAIL: kustomizations {found} but profiles for {sorted(PROFILES)} (update PROFILES in {rel(Path(__file__))})")
        return 1
    print(f"validate-deploy: kubernetes-validate {kubernetes_validate.__version__}, strict schemas of Kubernetes {', '.join(KUBE_VERSIONS)}")
    for name in found:
        kdir = DEPLOY / name
        before = len(report.errors)
        try:
            objs = render(kdir)
        except RenderError as e:
            report.check(False, f"{name}: cannot render: {e}")
            print(f"  {name}: cannot render")
            continue
        compared = compare_with_kubectl(name, kdir, objs, report)
        validate_schemas(name, objs, report)
        facts = check_kustomization(name, objs, report)
        check_images(name, objs, facts.get("uid"), report)
        extra = ""
        if PROFILES[name].get("secret_examples"):
            ns = next(o["metadata"].get("namespace", "") for o in objs if o["kind"] not in CLUSTER_KINDS)
            count = check_secret_examples(name, DEPLOY / PROFILES[name]["secret_examples"], ns, report)
            extra = f", {count} example Secrets"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(count_kinds(objs).items()))
        status = "ok" if len(report.errors) == before else f"{len(report.errors) - before} problems"
        print(
            f"  {name}: {len(objs)} objects ({kinds}){extra}; worker pods {facts.get('workers')} "
            f"({facts.get('ranks')} ranks), GPUs/pod {facts.get('gpus') or 0}; renderer vs kubectl: {compared}; {status}"
        )
    for n in report.notes:
        print(f"note: {n}")
    if report.errors:
        print(f"\nFAIL: {len(report.errors)} problems")
        for e in report.errors:
            print(f"  - {e}")
        return 1
    print("validate-deploy: all kustomizations render and validate")
    return 0


def count_kinds(objs: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in objs:
        out[o["kind"]] = out.get(o["kind"], 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
