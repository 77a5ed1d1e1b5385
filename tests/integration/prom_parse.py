"""prom_parse.py: a strict parser of the Prometheus text exposition format (version 0.0.4), for
tests that scrape tvillingd's /metrics (imported, never run).

parse(text) returns {family: {"type", "help", "samples": [(name, labels dict, value)]}} and raises
ParseError, naming the line, on anything the format does not allow or that tvilling's own
conventions forbid: a sample before its family's # TYPE, a second # TYPE, a duplicate series, a
bad name, label or escape, a value that is not a float, a counter without _total, histogram buckets
that are not cumulative or lack le="+Inf" equal to _count, a series without a site label.
"""

import math
import re

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class ParseError(Exception):
    pass


def _value(text, where):
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ParseError(f"{where}: value {text!r} is not a float")


def _labels(text, i, where):
    """Parses {k="v",...} starting at text[i] == '{'; returns (dict, index after '}')."""
    labels = {}
    i += 1
    while True:
        if i < len(text) and text[i] == "}":
            return labels, i + 1
        m = LABEL.match(text, i)
        if not m:
            raise ParseError(f"{where}: bad label name at column {i + 1}")
        key = m.group(0)
        i = m.end()
        if text[i:i + 2] != '="':
            raise ParseError(f"{where}: expected =\" after label {key}")
        i += 2
        value = []
        while True:
            if i >= len(text):
                raise ParseError(f"{where}: unterminated label value")
            c = text[i]
            if c == "\\":
                nxt = text[i + 1:i + 2]
                if nxt not in ("\\", '"', "n"):
                    raise ParseError(f"{where}: bad escape \\{nxt} in label {key}")
                value.append("\n" if nxt == "n" else nxt)
                i += 2
            elif c == '"':
                i += 1
                break
            elif c == "\n":
                raise ParseError(f"{where}: raw newline in label {key}")
            else:
                value.append(c)
                i += 1
        if key in labels:
            raise ParseError(f"{where}: label {key} twice")
        labels[key] = "".join(value)
        if text[i:i + 1] == ",":
            i += 1
        elif text[i:i + 1] != "}":
            raise ParseError(f"{where}: expected , or }} after label {key}")


def _family_of(name, families):
    if name in families:
        return name
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[:-len(suffix)] in families:
            return name[:-len(suffix)]
    return None


def parse(text, require_site=True):
    if not text.endswith("\n"):
        raise ParseError("the exposition must end with a newline")
    families = {}
    seen = set()
    for n, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {n}"
        if line == "":
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not NAME.fullmatch(name):
                    raise ParseError(f"{where}: bad metric name {name!r}")
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                if parts[1] == "TYPE":
                    if fam["type"] is not None:
                        raise ParseError(f"{where}: second # TYPE for {name}")
                    if fam["samples"]:
                        raise ParseError(f"{where}: # TYPE for {name} after its samples")
                    kind = parts[3] if len(parts) > 3 else ""
                    if kind not in TYPES:
                        raise ParseError(f"{where}: unknown type {kind!r}")
                    fam["type"] = kind
                else:
                    if fam["help"] is not None:
                        raise ParseError(f"{where}: second # HELP for {name}")
                    fam["help"] = parts[3] if len(parts) > 3 else ""
            continue
        m = NAME.match(line)
        if not m:
            raise ParseError(f"{where}: bad sample line {line!r}")
        name = m.group(0)
        i = m.end()
        labels = {}
        if line[i:i + 1] == "{":
            labels, i = _labels(line, i, where)
        if line[i:i + 1] != " ":
            raise ParseError(f"{where}: expected a space before the value")
        fields = line[i + 1:].split(" ")
        if len(fields) not in (1, 2):
            raise ParseError(f"{where}: expected a value and an optional timestamp")
        value = _value(fields[0], where)
        fam_name = _family_of(name, families)
        if fam_name is None or families[fam_name]["type"] is None:
            raise ParseError(f"{where}: sample {name} has no # TYPE before it")
        fam = families[fam_name]
        if fam["type"] == "counter" and not name.endswith("_total"):
            raise ParseError(f"{where}: counter {name} does not end in _total")
        if fam["type"] == "histogram" and name == fam_name:
            raise ParseError(f"{where}: histogram sample {name} without _bucket/_sum/_count")
        if require_site and "site" not in labels:
            raise ParseError(f"{where}: {name} has no site label")
        key = (name, tuple(sorted(labels.items())))
        if key in seen:
            raise ParseError(f"{where}: duplicate series {name}{labels}")
        seen.add(key)
        fam["samples"].append((name, labels, value))
    for fam_name, fam in families.items():
        if fam["type"] is None:
            raise ParseError(f"{fam_name}: # HELP without # TYPE")
        if fam["type"] == "histogram":
            _check_histogram(fam_name, fam)
    return families


def _check_histogram(fam_name, fam):
    series = {}
    for name, labels, value in fam["samples"]:
        base = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        s = series.setdefault(base, {"buckets": [], "count": None, "sum": None})
        if name.endswith("_bucket"):
            if "le" not in labels:
                raise ParseError(f"{fam_name}: bucket without le")
            s["buckets"].append((_value(labels["le"], fam_name), value))
        elif name.endswith("_count"):
            s["count"] = value
        elif name.endswith("_sum"):
            s["sum"] = value
    for base, s in series.items():
        buckets = sorted(s["buckets"])
        if not buckets or buckets[-1][0] != math.inf:
            raise ParseError(f"{fam_name}{dict(base)}: no le=\"+Inf\" bucket")
        for (_, a), (_, b) in zip(buckets, buckets[1:]):
            if b < a:
                raise ParseError(f"{fam_name}{dict(base)}: buckets are not cumulative")
        if s["count"] is None or s["sum"] is None:
            raise ParseError(f"{fam_name}{dict(base)}: _count or _sum missing")
        if buckets[-1][1] != s["count"]:
            raise ParseError(f"{fam_name}{dict(base)}: +Inf bucket {buckets[-1][1]} != _count "
                             f"{s['count']}")


def value(families, name, **labels):
    """The value of the one series of `name` whose labels include `labels` (None if none)."""
    fam = families.get(_family_of(name, families) or name)
    if fam is None:
        return None
    found = [v for n, ls, v in fam["samples"]
             if n == name and all(ls.get(k) == str(val) for k, val in labels.items())]
    if len(found) > 1:
        raise ParseError(f"{name}{labels}: {len(found)} series match")
    return found[0] if found else None
