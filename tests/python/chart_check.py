"""Schema checks for the ferry-cloud Helm chart, used by tests/tests/helm.rs.

  chart_check.py values CHART [OVERRIDES.yaml ...]
      Merges the override files onto CHART/values.yaml the way Helm does (maps merge, everything
      else is replaced) and validates the result against CHART/values.schema.json. Works without
      helm. Prints `values ok: <files>`.

  chart_check.py refs CHART
      Checks that every values path the templates read (`.Values.a.b`, and `$x.b` where the
      template says `$x := .Values.a`) exists in CHART/values.yaml, so that a renamed value
      cannot silently render as empty. Works without helm. Prints `refs ok: N paths`.

  chart_check.py manifests RENDERED.yaml --kube-version 1.27 [--kube-version 1.35 ...]
      Validates every document of `helm template` output against the Kubernetes OpenAPI schemas
      (kubernetes-validate, strict: unknown fields are errors) for each version, and
      monitoring.coreos.com/v1 ServiceMonitors (a CRD those schemas do not have) against the
      subset of the prometheus-operator schema the chart uses. Prints the documents as one JSON
      array on stdout for the Rust test's own checks.

Exits 1 with the reasons on stderr when anything is invalid.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

# The part of prometheus-operator's ServiceMonitor (monitoring.coreos.com/v1) the chart writes.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "required": ["key"],
                                        "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def merge(base, override):
    """Helm's values merge: maps merge key by key, anything else (lists too) is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base.get(k), v) if k in base else v
        return out
    return override


def check_values(chart, overrides):
    schema = json.loads((chart / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((chart / "values.yaml").read_text())
    names = ["values.yaml"]
    for f in overrides:
        values = merge(values, yaml.safe_load(Path(f).read_text()) or {})
        names.append(Path(f).name)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(values), key=lambda e: list(e.path))
    for e in errors:
        print(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print("values ok: " + " + ".join(names))


def check_refs(chart):
    values = yaml.safe_load((chart / "values.yaml").read_text())
    alias_re = re.compile(r"\$(\w+)\s*:=\s*\.Values((?:\.\w+)*)\s*}}")
    seen, missing = set(), []
    for t in sorted((chart / "templates").glob("*")):
        text = t.read_text()
        refs = [m.group(1) for m in re.finditer(r"(?<![\w$])\.Values((?:\.\w+)+)", text)]
        for alias, prefix in alias_re.findall(text):
            refs += [prefix + m.group(1) for m in re.finditer(r"\$" + alias + r"((?:\.\w+)+)", text)]
        for ref in refs:
            node = values
            for key in ref.strip(".").split("."):
                if not isinstance(node, dict):
                    break  # a value read as a whole (a map or list), below it is free-form
                if key not in node:
                    missing.append(f"{t.name}: .Values{ref}")
                    break
                node = node[key]
            seen.add(ref)
    for m in sorted(set(missing)):
        print(f"not in values.yaml: {m}", file=sys.stderr)
    if missing or not seen:
        sys.exit(1)
    print(f"refs ok: {len(seen)} paths")


def check_manifests(path, versions):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    failures = []
    for d in docs:
        name = f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        if d.get("kind") == "ServiceMonitor":
            for e in jsonschema.Draft7Validator(SERVICE_MONITOR).iter_errors(d):
                failures.append(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
            continue
        for v in versions:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{name} (Kubernetes {v}): {'/'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                failures.append(f"{name} (Kubernetes {v}): no schema: {e}")
    for f in failures:
        print(f, file=sys.stderr)
    if failures:
        sys.exit(1)
    json.dump(docs, sys.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("values")
    v.add_argument("chart", type=Path)
    v.add_argument("overrides", nargs="*")
    r = sub.add_parser("refs")
    r.add_argument("chart", type=Path)
    m = sub.add_parser("manifests")
    m.add_argument("rendered")
    m.add_argument("--kube-version", action="append", required=True)
    a = p.parse_args()
    if a.cmd == "values":
        check_values(a.chart, a.overrides)
    elif a.cmd == "refs":
        check_refs(a.chart)
    else:
        check_manifests(a.rendered, a.kube_version)


if __name__ == "__main__":
    main()
