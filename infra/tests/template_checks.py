"""Checks of what infra/template.yaml must keep doing, as functions that return problems.

Each `check_*` takes the template (plain dicts and lists, as `load_template` returns it) and
returns a list of human-readable problems; an empty list means the template keeps that promise.
The tests run every check on the real template and on copies weakened in memory, so each check
is shown to catch the weakening it exists for.
"""

from __future__ import annotations

import json
import re
import string
import tomllib
from pathlib import Path
from typing import Any, Iterator

INFRA = Path(__file__).resolve().parent.parent
REPO = INFRA.parent
TEMPLATE_PATH = INFRA / "template.yaml"

READ = "ReadFunction"
INVALIDATOR = "InvalidatorFunction"
INSPECTOR = "InspectorFunction"
TABLE = "ProductTable"
SECRET = "CacheAuthSecret"
CACHE = "CacheReplicationGroup"
IAM_USER = "CacheIamUser"
INSPECTOR_USER = "CacheInspectorIamUser"
USER_GROUP = "CacheUserGroup"
AUTH_MODES = ("token", "iam")
# CacheType: nodes (the replication group, CACHE) or serverless (an ElastiCache Serverless
# cache, SERVERLESS). A serverless cache takes IAM authentication only (the template's Rules
# refuse token mode with it), so the variants deployed are these three.
CACHE_TYPES = ("nodes", "serverless")
SERVERLESS = "ServerlessCache"
CACHE_OF = {"nodes": CACHE, "serverless": SERVERLESS}
VARIANTS = (
    {"CacheType": "nodes", "CacheAuthMode": "token"},
    {"CacheType": "nodes", "CacheAuthMode": "iam"},
    {"CacheType": "serverless", "CacheAuthMode": "iam"},
)
FUNCTION_SG = "FunctionSecurityGroup"
EXPECTED_BINARIES = {
    READ: "read-function",
    INVALIDATOR: "invalidator-function",
    INSPECTOR: "inspector-function",
}
# The ElastiCache user each function authenticates as in iam mode: the inspector has its own,
# because it needs RANDOMKEY, which the functions' user must not have.
CACHE_USER_OF = {READ: IAM_USER, INVALIDATOR: IAM_USER, INSPECTOR: INSPECTOR_USER}
VPC_ACCESS_POLICY = "service-role/AWSLambdaVPCAccessExecutionRole"
STREAM_READ_ACTIONS = {
    "dynamodb:DescribeStream",
    "dynamodb:GetRecords",
    "dynamodb:GetShardIterator",
    "dynamodb:ListStreams",
}
# ElastiCache AUTH: 16-128 printable ASCII characters; of the special characters only these.
AUTH_SPECIALS = set("!&#$^<>-")
# The table actions each table reader may have, on the table only: the read function reads one
# item on a single read's miss and up to 100 on a batch's; the inspector one at a time for its
# sample and up to 100 at a time for the change monitor.
TABLE_READS = {
    READ: {"dynamodb:GetItem", "dynamodb:BatchGetItem"},
    INSPECTOR: {"dynamodb:GetItem", "dynamodb:BatchGetItem"},
}
# Functions whose roles an event source mapping reads the table's stream with, on that stream
# only: the invalidator, and the inspector for the change monitor.
STREAM_READERS = {INVALIDATOR, INSPECTOR}
# DynamoDB Streams serves at most two concurrent readers per shard; a third throttles them all.
MAX_STREAM_READERS = 2
# The change monitor: its switch, its mapping and the settings the issue fixes for it.
MONITOR_PARAM = "ChangeMonitor"
MONITOR_SHARE_PARAM = "ChangeMonitorShare"
MONITOR_SETTINGS = {
    "StartingPosition": "LATEST",
    "BatchSize": 1000,
    "MaximumBatchingWindowInSeconds": 10,
    "ParallelizationFactor": 1,
    "MaximumRetryAttempts": 2,
    "MaximumRecordAgeInSeconds": 3600,
    "BisectBatchOnFunctionError": False,
}
# The read function's HTTP API routes, (method, path), on the template's HttpApi.
API = "ProductApi"
READ_ROUTES = {("GET", "/products/{id}"), ("GET", "/products")}
# Lambda's limits for stream event source mappings (-1, "forever", is excluded on purpose).
RETRY_BOUNDS = (0, 10_000)
RECORD_AGE_BOUNDS = (60, 604_800)


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """The template as plain JSON-like data, through cfn-lint's decoder (it knows !Ref & co.)."""
    from cfnlint.decode import decode

    template, matches = decode(str(path))
    if matches:
        raise ValueError(f"{path} does not parse: {[str(m) for m in matches]}")
    # The decoder's node types carry line numbers; plain data is easier to copy and weaken.
    return json.loads(json.dumps(template))


# ---- helpers ----------------------------------------------------------------------------------


def resources(t: dict, type_: str | None = None) -> dict[str, dict]:
    return {
        name: r
        for name, r in t.get("Resources", {}).items()
        if type_ is None or r.get("Type") == type_
    }


def props(t: dict, name: str) -> dict:
    return t.get("Resources", {}).get(name, {}).get("Properties", {}) or {}


def as_list(v: Any) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def sub_names(s: str) -> set[str]:
    """Names a Fn::Sub string refers to: `${X}` and `${X.Attr}` give X (`${!X}` is literal)."""
    return {m.split(".")[0] for m in re.findall(r"\$\{(?!!)([^}]+)\}", s)}


def referenced_names(node: Any) -> set[str]:
    """Every resource or parameter name a node refers to through Ref, GetAtt or Sub."""
    names: set[str] = set()
    for n in walk(node):
        if not isinstance(n, dict):
            continue
        if isinstance(n.get("Ref"), str):
            names.add(n["Ref"])
        ga = n.get("Fn::GetAtt")
        if isinstance(ga, list) and ga:
            names.add(ga[0])
        elif isinstance(ga, str):
            names.add(ga.split(".")[0])
        sub = n.get("Fn::Sub")
        if isinstance(sub, str):
            names |= sub_names(sub)
        elif isinstance(sub, list) and sub and isinstance(sub[0], str):
            names |= sub_names(sub[0])
    return names


def getatt(node: Any) -> tuple[str, str] | None:
    """(resource, attribute) of an Fn::GetAtt node, else None."""
    ga = node.get("Fn::GetAtt") if isinstance(node, dict) else None
    if isinstance(ga, str):
        ga = ga.split(".", 1)
    if isinstance(ga, list) and len(ga) == 2 and all(isinstance(x, str) for x in ga):
        return ga[0], ga[1]
    return None


def is_getatt(node: Any, resource: str, attr: str) -> bool:
    return getatt(node) == (resource, attr)


def is_ref(node: Any, name: str) -> bool:
    return isinstance(node, dict) and node.get("Ref") == name


def if_branches(node: Any) -> list[Any]:
    """The possible values of a node: both branches of an Fn::If, else the node itself."""
    if isinstance(node, dict) and "Fn::If" in node:
        _, yes, no = node["Fn::If"]
        return if_branches(yes) + if_branches(no)
    return [node]


def bounds(t: dict, value: Any) -> tuple[float, float] | None:
    """The range a numeric property can take: a literal, or a Number parameter's limits.

    None when the value is missing, not numeric, or a parameter without both limits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return (value, value)
    if isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            return None
        return (v, v)
    if is_ref_to_parameter(t, value):
        p = t["Parameters"][value["Ref"]]
        if "AllowedValues" in p:
            vals = [float(v) for v in p["AllowedValues"]]
            return (min(vals), max(vals))
        if "MinValue" in p and "MaxValue" in p:
            return (float(p["MinValue"]), float(p["MaxValue"]))
        return None
    return None


def lower_bound(t: dict, value: Any) -> float | None:
    if is_ref_to_parameter(t, value):
        p = t["Parameters"][value["Ref"]]
        if "AllowedValues" in p:
            return min(float(v) for v in p["AllowedValues"])
        if "MinValue" in p:
            return float(p["MinValue"])
        return None
    b = bounds(t, value)
    return b[0] if b else None


def default_of(t: dict, value: Any) -> Any:
    if is_ref_to_parameter(t, value):
        return t["Parameters"][value["Ref"]].get("Default")
    return value


def is_ref_to_parameter(t: dict, value: Any) -> bool:
    return isinstance(value, dict) and value.get("Ref") in t.get("Parameters", {})


def role_statements(t: dict, function: str) -> tuple[str | None, list[dict], list[str]]:
    """(role name, Allow statements of every policy attached to it, problems finding them)."""
    problems: list[str] = []
    fp = props(t, function)
    if "Policies" in fp:
        problems.append(f"{function} has SAM Policies; permissions belong in its explicit role")
    role = getatt(fp.get("Role"))
    if not role or role[1] != "Arn":
        problems.append(f"{function} must use an explicit role (Role: !GetAtt <Role>.Arn)")
        return None, [], problems
    role_name = role[0]
    if t["Resources"].get(role_name, {}).get("Type") != "AWS::IAM::Role":
        problems.append(f"{function}'s role {role_name} is not an AWS::IAM::Role in the template")
        return role_name, [], problems
    rp = props(t, role_name)
    statements: list[dict] = []
    for policy in as_list(rp.get("Policies")):
        statements += as_list(policy.get("PolicyDocument", {}).get("Statement"))
    # A statement under !If counts with both its branches (AWS::NoValue drops out).
    statements = [
        b for s in statements for b in if_branches(s) if isinstance(b, dict) and not is_ref(b, "AWS::NoValue")
    ]
    # Policies attached from outside the role count too.
    for name, r in resources(t).items():
        if r["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy", "AWS::IAM::RolePolicy"):
            attached = as_list(r.get("Properties", {}).get("Roles")) + as_list(
                r.get("Properties", {}).get("RoleName")
            )
            if any(is_ref(a, role_name) for a in attached):
                statements += as_list(
                    r.get("Properties", {}).get("PolicyDocument", {}).get("Statement")
                )
    for arn in as_list(rp.get("ManagedPolicyArns")):
        text = arn.get("Fn::Sub") if isinstance(arn, dict) else arn
        if not (isinstance(text, str) and text.endswith(VPC_ACCESS_POLICY)):
            problems.append(
                f"{role_name} attaches managed policy {arn!r}; only {VPC_ACCESS_POLICY} is allowed"
            )
    for s in statements:
        if s.get("Effect") != "Allow":
            continue
        if "NotAction" in s or "NotResource" in s:
            problems.append(f"{role_name} uses NotAction/NotResource: {s}")
    return role_name, [s for s in statements if s.get("Effect") == "Allow"], problems


def actions_of(statement: dict) -> list[str]:
    return [a for a in as_list(statement.get("Action")) if isinstance(a, str)]


def wildcard_problems(role: str, statement: dict) -> list[str]:
    problems = []
    for a in actions_of(statement):
        if "*" in a:
            problems.append(f"{role}: wildcard action {a!r}")
    for r in as_list(statement.get("Resource")):
        for value in if_branches(r):
            if isinstance(value, str) and value.strip() == "*":
                problems.append(f"{role}: Resource '*' for {actions_of(statement)}")
    return problems


# ---- checks -----------------------------------------------------------------------------------


def check_stream_event_source(t: dict) -> list[str]:
    """The invalidator's stream mapping keeps partial batch responses, bisecting, bounded retries
    and record age, and an on-failure destination."""
    events = props(t, INVALIDATOR).get("Events", {}) or {}
    streams = [e for e in events.values() if e.get("Type") == "DynamoDB"]
    if len(streams) != 1:
        return [f"{INVALIDATOR} must have exactly one DynamoDB stream event, has {len(streams)}"]
    p = streams[0].get("Properties", {})
    problems = []
    if "ReportBatchItemFailures" not in as_list(p.get("FunctionResponseTypes")):
        problems.append("stream event lost FunctionResponseTypes: [ReportBatchItemFailures]")
    if p.get("BisectBatchOnFunctionError") is not True:
        problems.append("stream event lost BisectBatchOnFunctionError: true")
    for key, (lo, hi) in (
        ("MaximumRetryAttempts", RETRY_BOUNDS),
        ("MaximumRecordAgeInSeconds", RECORD_AGE_BOUNDS),
    ):
        b = bounds(t, p.get(key))
        if b is None:
            problems.append(f"stream event {key} is unbounded (missing means -1, forever)")
        elif b[0] < lo or b[1] > hi:
            problems.append(f"stream event {key} may be {b}, outside [{lo}, {hi}]")
    on_failure = p.get("DestinationConfig", {}).get("OnFailure", {})
    dest = getatt(on_failure.get("Destination"))
    if not dest or dest[1] != "Arn" or t["Resources"].get(dest[0], {}).get("Type") != "AWS::SQS::Queue":
        problems.append("stream event has no OnFailure destination on an SQS queue of this stack")
    if on_failure.get("Type") != "SQS":
        problems.append("stream event OnFailure must say Type: SQS")
    if p.get("StartingPosition") != "TRIM_HORIZON":
        problems.append("stream event must start at TRIM_HORIZON (a new mapping replays what it missed)")
    stream = p.get("Stream")
    if not (
        isinstance(stream, dict)
        and "Fn::If" in stream
        and is_getatt(stream["Fn::If"][1], TABLE, "StreamArn")
        and is_ref(stream["Fn::If"][2], "ExistingTableStreamArn")
    ):
        problems.append("stream event must read !If [CreateTable, ProductTable.StreamArn, ExistingTableStreamArn]")
    return problems


def check_record_age_covers_ttl(t: dict) -> list[str]:
    """Giving up on a record only once its entries have expired by TTL (+ a lease) loses nothing."""
    p = next(
        (e.get("Properties", {}) for e in (props(t, INVALIDATOR).get("Events") or {}).values()
         if e.get("Type") == "DynamoDB"),
        {},
    )
    age = default_of(t, p.get("MaximumRecordAgeInSeconds"))
    ttl = default_of(t, {"Ref": "CacheTtlSeconds"})
    lease_ms = default_of(t, {"Ref": "LeaseMs"})
    try:
        if float(age) < float(ttl) + float(lease_ms) / 1000:
            return [
                f"default MaximumRecordAgeInSeconds {age} is below CACHE_TTL_SECONDS {ttl} + "
                f"LEASE_MS {lease_ms}: a record given up earlier leaves its entry stale"
            ]
    except (TypeError, ValueError):
        return ["MaximumRecordAgeInSeconds, CacheTtlSeconds and LeaseMs need numeric defaults"]
    return []


def check_read_function_policies(t: dict) -> list[str]:
    """The read function may GetItem and BatchGetItem on the table and read the AUTH token;
    nothing else."""
    return _table_reader_problems(t, READ)


def check_inspector_policies(t: dict) -> list[str]:
    """The inspector, like the read function, may only GetItem and BatchGetItem on the table and
    read the AUTH token (or connect as its own cache user): it never writes the table. For the
    change monitor its mapping reads the table's stream, and that stream only."""
    return _table_reader_problems(t, INSPECTOR)


def _table_reader_problems(t: dict, function: str) -> list[str]:
    role, statements, problems = role_statements(t, function)
    if role is None:
        return problems
    allowed = TABLE_READS[function]
    stream_actions = STREAM_READ_ACTIONS if function in STREAM_READERS else set()
    granted: set[str] = set()
    streamed: set[str] = set()
    for s in statements:
        problems += wildcard_problems(role, s)
        acts = actions_of(s)
        for a in acts:
            if a in stream_actions:
                streamed.add(a)
                for r in as_list(s.get("Resource")):
                    if not _is_stream_arn(r, a):
                        problems.append(f"{role}: {a} on {r!r}, not the table's stream")
            elif a.lower().startswith("dynamodb:") and a not in allowed:
                problems.append(f"{role}: {function} must not have {a}")
            elif a == "elasticache:Connect":
                problems += _connect_problems_per_type(t, role, s, CACHE_USER_OF[function])
            elif not a.lower().startswith("dynamodb:") and a != "secretsmanager:GetSecretValue":
                problems.append(f"{role}: unexpected action {a}")
        reads = allowed & set(acts)
        if reads:
            granted |= reads
            for r in as_list(s.get("Resource")):
                if not _is_table_arn(r):
                    problems.append(f"{role}: {sorted(reads)} on {r!r}, not the table ARN")
        if "secretsmanager:GetSecretValue" in acts:
            if [r for r in as_list(s.get("Resource")) if not is_ref(r, SECRET)]:
                problems.append(f"{role}: GetSecretValue beyond {SECRET}")
    for a in sorted(allowed - granted):
        problems.append(f"{role}: no {a} on the table")
    if streamed and streamed != stream_actions:
        problems.append(
            f"{role}: stream grant lacks {sorted(stream_actions - streamed)} (its mapping would fail)"
        )
    return problems


def check_read_routes(t: dict) -> list[str]:
    """The read function is invoked by the HTTP API's two routes, GET /products/{id} and GET
    /products (the batch), on the template's own HttpApi, and by nothing else: no ANY method, no
    catch-all, no implicit API without its throttling and logs."""
    problems = []
    events = props(t, READ).get("Events") or {}
    routes = set()
    for name, e in events.items():
        p = e.get("Properties", {})
        if e.get("Type") != "HttpApi":
            problems.append(f"{READ} event {name} is a {e.get('Type')}, not an HttpApi route")
            continue
        if not is_ref(p.get("ApiId"), API):
            problems.append(f"{READ} event {name} is not on {API}")
        routes.add((str(p.get("Method", "ANY")).upper(), p.get("Path", "$default")))
    for method, path in sorted(routes - READ_ROUTES):
        problems.append(f"{READ} has the route {method} {path}; only {sorted(READ_ROUTES)}")
    for method, path in sorted(READ_ROUTES - routes):
        problems.append(f"{READ} lacks the route {method} {path}")
    return problems


def _is_table_arn(r: Any) -> bool:
    """!If [CreateTable, !GetAtt ProductTable.Arn, !Sub ...:table/${ExistingTableName}]"""
    if not (isinstance(r, dict) and "Fn::If" in r):
        return False
    cond, yes, no = r["Fn::If"]
    return (
        cond == "CreateTable"
        and is_getatt(yes, TABLE, "Arn")
        and isinstance(no, dict)
        and isinstance(no.get("Fn::Sub"), str)
        and no["Fn::Sub"].endswith(":table/${ExistingTableName}")
    )


def check_invalidator_policies(t: dict) -> list[str]:
    """The invalidator reads the stream (and only it), the AUTH token, and reports to its queue.
    It has no table actions at all, so in particular no writes."""
    role, statements, problems = role_statements(t, INVALIDATOR)
    if role is None:
        return problems
    for s in statements:
        problems += wildcard_problems(role, s)
        acts = actions_of(s)
        for a in acts:
            if a.lower().startswith("dynamodb:") and a not in STREAM_READ_ACTIONS:
                problems.append(f"{role}: invalidator must not have {a}")
            elif a.lower().startswith("dynamodb:"):
                for r in as_list(s.get("Resource")):
                    if not _is_stream_arn(r, a):
                        problems.append(f"{role}: {a} on {r!r}, not the table's stream")
            elif a == "sqs:SendMessage":
                if [r for r in as_list(s.get("Resource")) if not is_getatt(r, "StreamFailureQueue", "Arn")]:
                    problems.append(f"{role}: sqs:SendMessage beyond the on-failure queue")
            elif a == "secretsmanager:GetSecretValue":
                if [r for r in as_list(s.get("Resource")) if not is_ref(r, SECRET)]:
                    problems.append(f"{role}: GetSecretValue beyond {SECRET}")
            elif a == "elasticache:Connect":
                problems += _connect_problems_per_type(t, role, s)
            else:
                problems.append(f"{role}: unexpected action {a}")
    granted = {a for s in statements for a in actions_of(s)}
    missing = (STREAM_READ_ACTIONS | {"sqs:SendMessage", "secretsmanager:GetSecretValue"}) - granted
    if missing:
        problems.append(f"{role}: missing {sorted(missing)} (the mapping or the function would fail)")
    return problems


REPLICATION_GROUP_ARN = (
    "arn:${AWS::Partition}:elasticache:${AWS::Region}:${AWS::AccountId}:replicationgroup:${%s}" % CACHE
)
# A serverless cache's ARN has its own resource type; IAM tokens for it are granted on it.
SERVERLESS_CACHE_ARN = (
    "arn:${AWS::Partition}:elasticache:${AWS::Region}:${AWS::AccountId}:serverlesscache:${%s}" % SERVERLESS
)
CACHE_ARN_OF = {"nodes": REPLICATION_GROUP_ARN, "serverless": SERVERLESS_CACHE_ARN}


def _is_connect_resource(r: Any, user: str, cache_type: str = "nodes") -> bool:
    """The deployed cache's ARN (the replication group's, or the serverless cache's), or the IAM
    user's."""
    return (isinstance(r, dict) and r.get("Fn::Sub") == CACHE_ARN_OF[cache_type]) or is_getatt(r, user, "Arn")


def _connect_problems(role: str, statement: dict, user: str = IAM_USER, cache_type: str = "nodes") -> list[str]:
    """elasticache:Connect only on this stack's cache of the type deployed and the function's own
    IAM user, both. The statement as deployed: its !If on the cache type resolved."""
    resources_ = as_list(statement.get("Resource"))
    problems = [
        f"{role}: elasticache:Connect on {r!r}" for r in resources_ if not _is_connect_resource(r, user, cache_type)
    ]
    what = {"nodes": "the replication group", "serverless": "the serverless cache"}[cache_type]
    if not any(is_getatt(r, user, "Arn") for r in resources_) or not any(
        isinstance(r, dict) and r.get("Fn::Sub") == CACHE_ARN_OF[cache_type] for r in resources_
    ):
        problems.append(f"{role}: elasticache:Connect needs both {what} and {user}")
    if set(actions_of(statement)) != {"elasticache:Connect"}:
        problems.append(f"{role}: elasticache:Connect must stand alone in its statement")
    return problems


def _connect_problems_per_type(t: dict, role: str, statement: dict, user: str = IAM_USER) -> list[str]:
    """_connect_problems for each cache type, the statement's !If on the type resolved (with
    CacheType serverless only the serverless cache, never the replication group, and the other
    way round)."""
    problems = []
    for cache_type in CACHE_TYPES:
        deployed_statement = resolve_ifs(t, statement, {"CacheType": cache_type, "CacheAuthMode": "iam"})
        problems += [
            f"CacheType={cache_type}: {p_}" for p_ in _connect_problems(role, deployed_statement, user, cache_type)
        ]
    return problems


def _is_stream_arn(r: Any, action: str) -> bool:
    if not (isinstance(r, dict) and "Fn::If" in r and r["Fn::If"][0] == "CreateTable"):
        return False
    _, yes, no = r["Fn::If"]
    if action == "dynamodb:ListStreams":
        # ListStreams is authorised on the table's streams: <table arn>/stream/*.
        return (
            isinstance(yes, dict)
            and yes.get("Fn::Sub") == "${ProductTable.Arn}/stream/*"
            and isinstance(no, dict)
            and str(no.get("Fn::Sub", "")).endswith(":table/${ExistingTableName}/stream/*")
        )
    return is_getatt(yes, TABLE, "StreamArn") and is_ref(no, "ExistingTableStreamArn")


def check_replication_group(t: dict) -> list[str]:
    """Cluster mode, a replica per shard with automatic Multi-AZ failover, TLS required,
    encryption at rest, and an AUTH token that only exists in Secrets Manager."""
    p = props(t, CACHE)
    if not p:
        return [f"no {CACHE}"]
    problems = []
    expect = {
        "TransitEncryptionEnabled": True,
        "TransitEncryptionMode": "required",
        "AtRestEncryptionEnabled": True,
        "AutomaticFailoverEnabled": True,
        "MultiAZEnabled": True,
        "ClusterMode": "enabled",
    }
    for key, want in expect.items():
        if p.get(key) != want:
            problems.append(f"{CACHE}.{key} is {p.get(key)!r}, must be {want!r}")
    if p.get("Engine") not in ("valkey", "redis"):
        problems.append(f"{CACHE}.Engine must be valkey or redis")
    low = lower_bound(t, p.get("ReplicasPerNodeGroup"))
    if low is None or low < 1:
        problems.append(f"{CACHE}.ReplicasPerNodeGroup may be below 1 (no failover target)")
    if lower_bound(t, p.get("NumNodeGroups")) is None:
        problems.append(f"{CACHE}.NumNodeGroups must be set (cluster mode)")
    # The token, as deployed in token mode (iam mode has none: check_auth_modes).
    token = resolve_ifs(t, p, {"CacheAuthMode": "token"}).get("AuthToken")
    sub = token.get("Fn::Sub") if isinstance(token, dict) else None
    m = re.fullmatch(r"\{\{resolve:secretsmanager:\$\{(\w+)\}:SecretString:token\}\}", sub or "")
    if not m:
        problems.append(f"{CACHE}.AuthToken must be a secretsmanager dynamic reference, is {token!r}")
    elif t["Resources"].get(m.group(1), {}).get("Type") != "AWS::SecretsManager::Secret":
        problems.append(f"{CACHE}.AuthToken refers to {m.group(1)}, not a secret of this stack")
    for name, param in t.get("Parameters", {}).items():
        if param.get("NoEcho") or re.search(r"token|password|secret", name, re.I):
            problems.append(f"parameter {name} looks like a secret; the token is generated, not passed")
    return problems


def check_auth_secret(t: dict) -> list[str]:
    """The generated token obeys ElastiCache's AUTH rules, so creating the cache cannot fail on it."""
    g = props(t, SECRET).get("GenerateSecretString")
    if not g:
        return [f"{SECRET} must generate its value (GenerateSecretString)"]
    problems = []
    if g.get("SecretStringTemplate") != "{}" or g.get("GenerateStringKey") != "token":
        problems.append(f"{SECRET} must generate {{\"token\": ...}} (SecretStringTemplate '{{}}', key token)")
    length = g.get("PasswordLength", 32)
    if not 16 <= int(length) <= 128:
        problems.append(f"{SECRET} PasswordLength {length} outside ElastiCache's 16-128")
    if g.get("IncludeSpace"):
        problems.append(f"{SECRET} must not include spaces")
    if not g.get("ExcludePunctuation"):
        allowed_out = set(string.punctuation) - set(g.get("ExcludeCharacters", ""))
        bad = allowed_out - AUTH_SPECIALS
        if bad:
            problems.append(
                f"{SECRET} may generate {''.join(sorted(bad))!r}, which ElastiCache AUTH refuses"
            )
    return problems


def _sg_rules(t: dict) -> Iterator[tuple[str, str, dict]]:
    """(resource, 'ingress'|'egress', rule) for inline and standalone security group rules."""
    for name, r in resources(t, "AWS::EC2::SecurityGroup").items():
        p = r.get("Properties", {})
        for direction, key in (("ingress", "SecurityGroupIngress"), ("egress", "SecurityGroupEgress")):
            for rule in as_list(p.get(key)):
                # A rule under !If counts with both its branches.
                for branch in if_branches(rule):
                    if isinstance(branch, dict) and not is_ref(branch, "AWS::NoValue"):
                        yield name, direction, branch
    for name, r in resources(t, "AWS::EC2::SecurityGroupIngress").items():
        yield name, "ingress", r.get("Properties", {})
    for name, r in resources(t, "AWS::EC2::SecurityGroupEgress").items():
        yield name, "egress", r.get("Properties", {})


def _rule_target(t: dict, name: str, rule: dict) -> str | None:
    """The security group a rule belongs to: the group it is inline in, or a standalone rule's
    GroupId."""
    if name in resources(t, "AWS::EC2::SecurityGroup"):
        return name
    group = rule.get("GroupId")
    return group["Ref"] if isinstance(group, dict) and isinstance(group.get("Ref"), str) else None


# The cache's ports: 6379, and with a serverless cache its reader endpoint on 6380.
CACHE_PORTS = {"nodes": {6379}, "serverless": {6379, 6380}}


def check_security_groups(t: dict) -> list[str]:
    """No rule open to the internet; every group replaces the default allow-all egress; the
    functions accept nothing; the cache accepts 6379 from the functions only (a serverless
    cache 6379 and its reader endpoint's 6380), and the functions can reach those ports."""
    problems = []
    for name, direction, rule in _sg_rules(t):
        if rule.get("CidrIp") == "0.0.0.0/0" or rule.get("CidrIpv6") == "::/0":
            problems.append(f"{name}: {direction} open to the internet: {rule}")
    for name, r in resources(t, "AWS::EC2::SecurityGroup").items():
        if not as_list(r.get("Properties", {}).get("SecurityGroupEgress")):
            problems.append(
                f"{name} lists no SecurityGroupEgress, so it keeps the default allow-all egress to 0.0.0.0/0"
            )
    for name, direction, rule in _sg_rules(t):
        if _rule_target(t, name, rule) == FUNCTION_SG and direction == "ingress":
            problems.append(f"{FUNCTION_SG} must accept no connections: {rule}")
    for cache_type in CACHE_TYPES:
        d = deployed(t, {"CacheType": cache_type, "CacheAuthMode": "iam"})
        ports = CACHE_PORTS[cache_type]
        opened: dict[str, set] = {"ingress": set(), "egress": set()}
        for name, direction, rule in _sg_rules(d):
            target = _rule_target(d, name, rule)
            if target == "CacheSecurityGroup" and direction == "ingress":
                if not (
                    rule.get("FromPort") == rule.get("ToPort")
                    and rule.get("FromPort") in ports
                    and is_ref(rule.get("SourceSecurityGroupId"), FUNCTION_SG)
                ):
                    problems.append(
                        f"CacheType={cache_type}: CacheSecurityGroup ingress beyond {sorted(ports)} from the functions: {rule}"
                    )
                else:
                    opened["ingress"].add(rule["FromPort"])
            if target == FUNCTION_SG and direction == "egress" and is_ref(
                rule.get("DestinationSecurityGroupId"), "CacheSecurityGroup"
            ) and rule.get("FromPort") == rule.get("ToPort"):
                opened["egress"].add(rule.get("FromPort"))
        for direction, got in opened.items():
            if ports - got:
                problems.append(
                    f"CacheType={cache_type}: no {direction} on {sorted(ports - got)} between the functions and the cache"
                )
    return problems


def check_table(t: dict) -> list[str]:
    p = props(t, TABLE)
    if not p:
        return [f"no {TABLE}"]
    problems = []
    if p.get("BillingMode") != "PAY_PER_REQUEST":
        problems.append(f"{TABLE} must be PAY_PER_REQUEST")
    if p.get("StreamSpecification", {}).get("StreamViewType") != "NEW_AND_OLD_IMAGES":
        problems.append(f"{TABLE} stream must be NEW_AND_OLD_IMAGES (refresh mode needs NewImage)")
    if p.get("PointInTimeRecoverySpecification", {}).get("PointInTimeRecoveryEnabled") is not True:
        problems.append(f"{TABLE} must have point-in-time recovery")
    sse = p.get("SSESpecification", {})
    if sse.get("SSEEnabled") is not True or sse.get("SSEType") != "KMS":
        problems.append(f"{TABLE} must have SSESpecification SSEEnabled true, SSEType KMS")
    if t["Resources"][TABLE].get("Condition") != "CreateTable":
        problems.append(f"{TABLE} must be created only when no existing table is given")
    if t["Resources"][TABLE].get("DeletionPolicy") != "Retain":
        problems.append(f"{TABLE} must be retained when the stack is deleted (it is the source of truth)")
    keys = p.get("KeySchema", [])
    if not (len(keys) == 1 and is_ref(keys[0].get("AttributeName"), "KeyAttributeName")):
        problems.append(f"{TABLE} must be keyed by the KeyAttributeName parameter only")
    return problems


def check_failure_queue_encrypted(t: dict) -> list[str]:
    p = props(t, "StreamFailureQueue")
    if not p and "StreamFailureQueue" not in t.get("Resources", {}):
        return ["no StreamFailureQueue"]
    if p.get("SqsManagedSseEnabled") is True or p.get("KmsMasterKeyId"):
        return []
    return ["StreamFailureQueue must be encrypted (SqsManagedSseEnabled or KmsMasterKeyId)"]


def check_function_build(t: dict) -> list[str]:
    """Both functions are arm64 provided.al2023 binaries that SAM builds with cargo-lambda from
    the workspace, and each names a binary the workspace really has."""
    problems = []
    cargo = tomllib.loads((REPO / "crates/functions/Cargo.toml").read_text())
    bins = {b["name"] for b in cargo.get("bin", [])}
    for name, binary in EXPECTED_BINARIES.items():
        r = t["Resources"].get(name)
        if not r or r.get("Type") != "AWS::Serverless::Function":
            problems.append(f"no AWS::Serverless::Function {name}")
            continue
        p, meta = r.get("Properties", {}), r.get("Metadata", {})
        if p.get("Runtime") != "provided.al2023":
            problems.append(f"{name}.Runtime must be provided.al2023")
        if p.get("Architectures") != ["arm64"]:
            problems.append(f"{name}.Architectures must be [arm64]")
        if p.get("Handler") != "bootstrap":
            problems.append(f"{name}.Handler must be bootstrap")
        if meta.get("BuildMethod") != "rust-cargolambda":
            problems.append(f"{name} Metadata.BuildMethod must be rust-cargolambda")
        if meta.get("BuildProperties", {}).get("Binary") != binary:
            problems.append(f"{name} Metadata.BuildProperties.Binary must be {binary}")
        if binary not in bins:
            problems.append(f"crates/functions/Cargo.toml has no [[bin]] {binary}")
        code = p.get("CodeUri")
        root = (INFRA / code).resolve() if isinstance(code, str) else None
        manifest = root / "Cargo.toml" if root else None
        if not manifest or not manifest.is_file() or "[workspace]" not in manifest.read_text():
            problems.append(f"{name}.CodeUri {code!r} must be the workspace root, relative to infra/")
    return problems


def check_vpc_endpoints(t: dict) -> list[str]:
    """DynamoDB through a gateway endpoint on the private route tables; Secrets Manager through
    an interface endpoint with private DNS, reachable on 443 from the functions only."""
    problems = []
    eps = resources(t, "AWS::EC2::VPCEndpoint")
    gw = [
        (n, r["Properties"]) for n, r in eps.items()
        if r["Properties"].get("ServiceName", {}).get("Fn::Sub", "").endswith(".dynamodb")
    ]
    if not gw:
        problems.append("no DynamoDB VPC endpoint")
    for n, p in gw:
        if p.get("VpcEndpointType", "Gateway") != "Gateway":
            problems.append(f"{n} must be a Gateway endpoint")
        rts = p.get("RouteTableIds")
        if not (isinstance(rts, dict) and "Fn::If" in rts and {"PrivateRouteTableA", "PrivateRouteTableB"}
                <= referenced_names(rts["Fn::If"][1])):
            problems.append(f"{n} must be attached to the private route tables")
        problems += _gateway_policy_problems(n, p.get("PolicyDocument"))
    sm = [
        (n, r["Properties"]) for n, r in eps.items()
        if r["Properties"].get("ServiceName", {}).get("Fn::Sub", "").endswith(".secretsmanager")
    ]
    if not sm:
        problems.append("no Secrets Manager VPC endpoint (the functions have no NAT)")
    for n, p in sm:
        if p.get("VpcEndpointType") != "Interface" or p.get("PrivateDnsEnabled") is not True:
            problems.append(f"{n} must be an Interface endpoint with PrivateDnsEnabled")
        for sg in as_list(p.get("SecurityGroupIds")):
            ingress = as_list(props(t, sg.get("Ref", "")).get("SecurityGroupIngress"))
            if not ingress or any(
                not (r.get("FromPort") == 443 and is_ref(r.get("SourceSecurityGroupId"), FUNCTION_SG))
                for r in ingress
            ):
                problems.append(f"{n}'s security group must accept 443 from {FUNCTION_SG} only")
    for name in EXPECTED_BINARIES:
        vpc = props(t, name).get("VpcConfig", {})
        if not any(is_ref(sg, FUNCTION_SG) for sg in as_list(vpc.get("SecurityGroupIds"))):
            problems.append(f"{name} must run in the VPC with {FUNCTION_SG}")
    return problems


def _gateway_policy_problems(name: str, policy: Any) -> list[str]:
    """In the stack's own VPC the DynamoDB endpoint carries the table reads of the read function
    (GetItem, BatchGetItem) and the inspector (the same), on the table only; in a shared VPC it
    keeps the default policy (NoValue), since other workloads use it too."""
    if not (isinstance(policy, dict) and "Fn::If" in policy):
        return [f"{name}'s policy must be narrowed under NarrowEndpointPolicies"]
    cond, narrow, shared = policy["Fn::If"]
    problems = []
    if cond != "NarrowEndpointPolicies" or not is_ref(shared, "AWS::NoValue"):
        problems.append(f"{name}'s policy must be narrowed under NarrowEndpointPolicies only")
    allowed = TABLE_READS[READ] | TABLE_READS[INSPECTOR]
    granted: set[str] = set()
    for s in as_list((narrow or {}).get("Statement")):
        if s.get("Effect") != "Allow":
            continue
        if "NotAction" in s or "NotResource" in s:
            problems.append(f"{name} uses NotAction/NotResource: {s}")
        acts = actions_of(s)
        for a in acts:
            if a not in allowed:
                problems.append(f"{name}'s policy allows {a}; only {sorted(allowed)}")
        granted |= set(acts) & allowed
        for r in as_list(s.get("Resource")):
            if not _is_table_arn(r):
                problems.append(f"{name}'s policy allows {acts} on {r!r}, not the table ARN")
    for a in sorted(allowed - granted):
        problems.append(f"{name}'s policy does not allow {a} on the table (the read path needs it)")
    return problems


def check_conditional_references(t: dict) -> list[str]:
    """A resource created only under a condition (the table, the VPC) is referenced only where
    that condition holds: in a resource with the same condition or inside the matching !If branch.
    Otherwise pointing the stack at an existing table or VPC fails to deploy."""
    conditions = t.get("Conditions", {})

    def canon(c: str) -> str:
        # `X: !Condition Y` is an alias of Y.
        seen = set()
        while isinstance(conditions.get(c), dict) and set(conditions[c]) == {"Condition"} and c not in seen:
            seen.add(c)
            c = conditions[c]["Condition"]
        return c

    def implied(c: str) -> frozenset:
        # A condition that is !And [!Condition A, ...] holds only where A holds too.
        c = canon(c)
        out = {c}
        node = conditions.get(c)
        if isinstance(node, dict) and set(node) == {"Fn::And"}:
            for part in node["Fn::And"]:
                if isinstance(part, dict) and set(part) == {"Condition"}:
                    out |= implied(part["Condition"])
        return frozenset(out)

    def negated(c: str) -> frozenset:
        # Where `Equals [Ref P, v]` is false, `Equals [Ref P, w]` holds if P allows only v and w
        # (CacheType nodes | serverless, CacheAuthMode token | iam): the no-branch of an !If on
        # one is the other's yes-branch.
        node = conditions.get(canon(c))
        if not (isinstance(node, dict) and set(node) == {"Fn::Equals"}):
            return frozenset()
        a, v = node["Fn::Equals"]
        if not (is_ref_to_parameter(t, a) and isinstance(v, str)):
            return frozenset()
        allowed = [str(x) for x in t["Parameters"][a["Ref"]].get("AllowedValues", [])]
        if len(allowed) != 2 or v not in allowed:
            return frozenset()
        (other,) = [x for x in allowed if x != v]
        return frozenset(
            name for name, n in conditions.items()
            if isinstance(n, dict) and set(n) == {"Fn::Equals"} and n["Fn::Equals"][0] == a
            and str(n["Fn::Equals"][1]) == other
        )

    conditional = {
        n: canon(r["Condition"]) for n, r in resources(t).items() if isinstance(r.get("Condition"), str)
    }
    problems = []

    def visit(node: Any, holds: frozenset, where: str) -> None:
        if isinstance(node, dict):
            if "Fn::If" in node and isinstance(node["Fn::If"], list) and len(node["Fn::If"]) == 3:
                cond, yes, no = node["Fn::If"]
                visit(yes, holds | implied(cond), where)
                visit(no, holds | negated(cond), where)
                return
            direct = {k: v for k, v in node.items() if k in ("Ref", "Fn::GetAtt")}
            sub = node.get("Fn::Sub")
            if isinstance(sub, list) and len(sub) == 2 and isinstance(sub[1], dict):
                # The text's own names; its variables' values are visited below, each under the
                # conditions of the !If it sits in.
                direct["Fn::Sub"] = sub[0]
                local = set(sub[1])
            else:
                direct["Fn::Sub"] = sub
                local = set()
            for name in referenced_names(direct) - local:
                need = conditional.get(name)
                if need and need not in holds:
                    problems.append(f"{where} refers to {name} (only created if {need}) outside !If {need}")
            for k, v in node.items():
                if k == "Fn::Sub" and isinstance(v, list) and len(v) == 2:
                    visit(v[1], holds, where)
                elif k not in ("Ref", "Fn::GetAtt", "Fn::Sub"):
                    visit(v, holds, where)
        elif isinstance(node, list):
            for v in node:
                visit(v, holds, where)

    for name, r in resources(t).items():
        own = implied(r["Condition"]) if isinstance(r.get("Condition"), str) else frozenset()
        for section in ("Properties", "Metadata"):
            visit(r.get(section, {}), own, name)
        for dep in as_list(r.get("DependsOn")):
            if conditional.get(dep) and conditional[dep] not in own:
                problems.append(f"{name} DependsOn {dep} (only created if {conditional[dep]})")
    for name, o in t.get("Outputs", {}).items():
        own = implied(o["Condition"]) if isinstance(o.get("Condition"), str) else frozenset()
        visit(o.get("Value"), own, f"output {name}")
    return problems


def _param_value(t: dict, value: Any, params: dict[str, str]) -> Any:
    """A !Ref to a parameter as its value for these parameters (else its default); anything
    else as it is."""
    if is_ref_to_parameter(t, value):
        name = value["Ref"]
        return str(params.get(name, t["Parameters"][name].get("Default", "")))
    return value


# What the functions' REDIS_URL must be for each cache type: rediss:// (TLS) to the replication
# group's configuration endpoint, or to the serverless cache's endpoint (always TLS there).
REDIS_URL_OF = {
    "nodes": f"rediss://${{{CACHE}.ConfigurationEndPoint.Address}}:${{{CACHE}.ConfigurationEndPoint.Port}}",
    "serverless": f"rediss://${{{SERVERLESS}.Endpoint.Address}}:${{{SERVERLESS}.Endpoint.Port}}",
}


def check_environment(t: dict) -> list[str]:
    """The functions get the deployed cache's TLS URL and type, the secret's ARN, and agree with
    the table on the key; the invalidator confirms its batches on every replica of a
    replication group, and on none with a serverless cache (it has no WAIT and refuses more)."""
    problems = []
    for cache_type in CACHE_TYPES:
        params = {"CacheType": cache_type}
        if cache_type == "serverless":
            params["CacheAuthMode"] = "iam"
        d = deployed(t, params)
        where = f"CacheType={cache_type}"
        for name in EXPECTED_BINARIES:
            env = props(d, name).get("Environment", {}).get("Variables", {})
            url = env.get("REDIS_URL", {})
            if not (isinstance(url, dict) and url.get("Fn::Sub") == REDIS_URL_OF[cache_type]):
                problems.append(
                    f"{where}: {name}: REDIS_URL must be {REDIS_URL_OF[cache_type]!r} (TLS, the cache's endpoint)"
                )
            if env.get("REDIS_CLUSTER") != "true":
                problems.append(f"{where}: {name}: REDIS_CLUSTER must be 'true' (cluster mode)")
            if _param_value(t, env.get("REDIS_CACHE_TYPE"), params) != cache_type:
                problems.append(
                    f"{where}: {name}: REDIS_CACHE_TYPE must be {cache_type!r}, is {env.get('REDIS_CACHE_TYPE')!r}"
                )
            if not is_ref(env.get("KEY_ATTRIBUTE"), "KeyAttributeName"):
                problems.append(f"{where}: {name}: KEY_ATTRIBUTE must be the table's key (KeyAttributeName)")
            if "VERSION_ATTRIBUTE" not in env:
                problems.append(f"{where}: {name}: VERSION_ATTRIBUTE must reach both functions (they must agree)")
        inv_env = props(d, INVALIDATOR).get("Environment", {}).get("Variables", {})
        confirm = inv_env.get("REDIS_CONFIRM_REPLICAS")
        if cache_type == "nodes" and not is_ref(confirm, "CacheReplicasPerShard"):
            problems.append(
                f"{where}: {INVALIDATOR}: REDIS_CONFIRM_REPLICAS must be !Ref CacheReplicasPerShard (a failover "
                "could lose acknowledged invalidations, and replica reads would serve them)"
            )
        if cache_type == "serverless" and str(confirm) != "0":
            problems.append(
                f"{where}: {INVALIDATOR}: REDIS_CONFIRM_REPLICAS must be 0, is {confirm!r} (a serverless "
                "cache has no WAIT: the invalidator refuses to start with more)"
            )
    for name in EXPECTED_BINARIES:
        env = props(t, name).get("Environment", {}).get("Variables", {})
        token_env = resolve_ifs(t, env, {"CacheAuthMode": "token"})
        if not is_ref(token_env.get("REDIS_AUTH_SECRET_ARN"), SECRET):
            problems.append(f"{name}: REDIS_AUTH_SECRET_ARN must be !Ref {SECRET} (token mode)")
    read_env = props(t, READ).get("Environment", {}).get("Variables", {})
    table_name = read_env.get("TABLE_NAME", {})
    if not (isinstance(table_name, dict) and "Fn::If" in table_name
            and is_ref(table_name["Fn::If"][1], TABLE) and is_ref(table_name["Fn::If"][2], "ExistingTableName")):
        problems.append(f"{READ}: TABLE_NAME must be !If [CreateTable, {TABLE}, ExistingTableName]")
    if read_env.get("CONSISTENT_READ") not in (None, "true"):
        problems.append(f"{READ}: CONSISTENT_READ false breaks invariant 1 (docs/consistency.md)")
    return problems


def env_names_missing_from_code(t: dict) -> set[str]:
    """Variables the template sets that no Rust source under crates/ names: a typo there would be
    a setting silently ignored."""
    sources = "\n".join(p.read_text() for p in (REPO / "crates").rglob("*.rs"))
    names = set()
    for name in EXPECTED_BINARIES:
        names |= set(props(t, name).get("Environment", {}).get("Variables", {}))
    return {n for n in names if f'"{n}"' not in sources}


def check_alarms(t: dict) -> list[str]:
    problems = []
    alarms = resources(t, "AWS::CloudWatch::Alarm")

    def watched(p: dict) -> list[tuple[str, str, Any]]:
        out = []
        if "MetricName" in p:
            out.append((p.get("Namespace"), p["MetricName"], p.get("Dimensions", [])))
        for m in as_list(p.get("Metrics")):
            for v in if_branches(m):
                ms = (v or {}).get("MetricStat", {}).get("Metric")
                if ms:
                    out.append((ms.get("Namespace"), ms.get("MetricName"), ms.get("Dimensions", [])))
        return out

    all_watched = [(n, w) for n, a in alarms.items() for w in watched(a.get("Properties", {}))]

    def has(namespace: str, metric: str, dim_ref: str | None) -> bool:
        for _, (ns, mn, dims) in all_watched:
            if ns == namespace and mn == metric and (
                dim_ref is None or dim_ref in referenced_names(dims)
            ):
                return True
        return False

    wanted = [
        ("AWS/Lambda", "IteratorAge", INVALIDATOR),
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "StreamFailureQueue"),
        ("AWS/Lambda", "Errors", READ),
        ("AWS/Lambda", "Throttles", READ),
        ("AWS/Lambda", "Errors", INVALIDATOR),
        ("AWS/Lambda", "Throttles", INVALIDATOR),
        ("AWS/ElastiCache", "EngineCPUUtilization", CACHE),
        ("AWS/ElastiCache", "DatabaseMemoryUsagePercentage", CACHE),
        ("AWS/ElastiCache", "Evictions", CACHE),
    ]
    for ns, metric, ref in wanted:
        if not has(ns, metric, ref):
            problems.append(f"no alarm on {ns} {metric} of {ref}")
    return problems


def evaluate_condition(t: dict, node: Any, params: dict[str, str]) -> bool:
    """Evaluates a condition (by name or expression) for the given parameter values."""
    if isinstance(node, str):
        return evaluate_condition(t, t["Conditions"][node], params)
    (fn, arg), = node.items()
    if fn == "Condition":
        return evaluate_condition(t, arg, params)
    if fn == "Fn::Not":
        return not evaluate_condition(t, arg[0], params)
    if fn == "Fn::And":
        return all(evaluate_condition(t, a, params) for a in arg)
    if fn == "Fn::Or":
        return any(evaluate_condition(t, a, params) for a in arg)
    if fn == "Fn::Equals":
        def value(v: Any) -> str:
            if is_ref_to_parameter(t, v):
                name = v["Ref"]
                return str(params.get(name, t["Parameters"][name].get("Default", "")))
            return str(v)
        return value(arg[0]) == value(arg[1])
    raise ValueError(f"cannot evaluate {node!r}")


def resolve_ifs(t: dict, node: Any, params: dict[str, str]) -> Any:
    """The node as CloudFormation would see it for these parameters: Fn::If resolved and
    AWS::NoValue removed."""
    if isinstance(node, dict):
        if "Fn::If" in node:
            cond, yes, no = node["Fn::If"]
            return resolve_ifs(t, yes if evaluate_condition(t, cond, params) else no, params)
        out = {}
        for k, v in node.items():
            r = resolve_ifs(t, v, params)
            if not is_ref(r, "AWS::NoValue"):
                out[k] = r
        return out
    if isinstance(node, list):
        return [r for r in (resolve_ifs(t, v, params) for v in node) if not is_ref(r, "AWS::NoValue")]
    return node


def check_cache_alarm_topology(t: dict) -> list[str]:
    """For every topology the parameters allow, each cache alarm watches exactly the nodes that
    exist: a missing node goes unwatched, a node that does not exist keeps the alarm guessing.
    The alarms of a replication group (CacheType nodes); check_serverless_alarms has the others."""
    problems = []
    shard_values = t["Parameters"]["CacheShards"].get("AllowedValues", [])
    replica_values = t["Parameters"]["CacheReplicasPerShard"].get("AllowedValues", [])
    if not shard_values or not replica_values:
        return ["CacheShards and CacheReplicasPerShard must be bounded by AllowedValues"]
    for name, alarm in resources(t, "AWS::CloudWatch::Alarm").items():
        if "AWS/ElastiCache" not in json.dumps(alarm):
            continue
        condition = alarm.get("Condition")
        if isinstance(condition, str) and not evaluate_condition(t, condition, {"CacheType": "nodes"}):
            continue
        for shards in shard_values:
            for replicas in replica_values:
                params = {"CacheShards": str(shards), "CacheReplicasPerShard": str(replicas)}
                metrics = resolve_ifs(t, alarm["Properties"].get("Metrics", []), params)
                nodes = set()
                for m in metrics:
                    for d in m.get("MetricStat", {}).get("Metric", {}).get("Dimensions", []):
                        nodes.add(str(d.get("Value", {}).get("Fn::Sub", "")).replace(f"${{{CACHE}}}", ""))
                want = {f"-{s:04d}-{n:03d}" for s in range(1, int(shards) + 1)
                        for n in range(1, int(replicas) + 2)}
                if nodes != want:
                    problems.append(
                        f"{name} with {shards} shard(s) x {replicas} replica(s) watches "
                        f"{sorted(nodes)}, the cache has {sorted(want)}"
                    )
    return problems


def check_function_sizing(t: dict) -> list[str]:
    """Memory, timeout, reserved concurrency and log retention are set, not left to defaults."""
    problems = []
    for name in EXPECTED_BINARIES:
        p = props(t, name)
        for key in ("MemorySize", "Timeout", "ReservedConcurrentExecutions"):
            if key not in p:
                problems.append(f"{name}.{key} must be set deliberately")
        group = p.get("LoggingConfig", {}).get("LogGroup")
        group = group.get("Ref") if isinstance(group, dict) else None
        if not (t["Resources"].get(group, {}).get("Type") == "AWS::Logs::LogGroup"
                and "RetentionInDays" in props(t, group)):
            problems.append(f"{name} must log to a log group of this stack with RetentionInDays")
    if int(props(t, READ).get("Timeout", 0)) >= 30:
        problems.append(f"{READ}.Timeout must stay under API Gateway's 30 s integration timeout")
    return problems


def check_outputs(t: dict) -> list[str]:
    """The outputs operators and scripts read, for either cache type: CacheEndpoint names the
    cache deployed (CacheConfigurationEndpoint, its earlier name, stays with a replication
    group)."""
    problems = []
    for cache_type in CACHE_TYPES:
        d = deployed(t, {"CacheType": cache_type, "CacheAuthMode": "iam"})
        want = {"ApiUrl", "TableName", "TableStreamArn", "CacheEndpoint", "StreamFailureQueueUrl", "StreamFailureQueueArn"}
        if cache_type == "nodes":
            want.add("CacheConfigurationEndpoint")
        missing = want - set(d.get("Outputs", {}))
        if missing:
            problems.append(f"CacheType={cache_type}: missing outputs {sorted(missing)}")
        endpoint = d.get("Outputs", {}).get("CacheEndpoint", {}).get("Value")
        if endpoint is not None and CACHE_OF[cache_type] not in referenced_names(endpoint):
            problems.append(f"CacheType={cache_type}: output CacheEndpoint does not name {CACHE_OF[cache_type]}")
    return problems


def check_serverless_requires_iam(t: dict) -> list[str]:
    """CacheType nodes is the default (existing stacks unchanged), and a Rule refuses CacheType
    serverless without CacheAuthMode iam: a serverless cache has no AUTH token, and this stack's
    cache users are IAM users."""
    param = t.get("Parameters", {}).get("CacheType", {})
    if set(param.get("AllowedValues", [])) != set(CACHE_TYPES) or param.get("Default") != "nodes":
        return ["parameter CacheType must allow nodes and serverless, default nodes"]

    def refused(params: dict[str, str]) -> bool:
        for rule in (t.get("Rules") or {}).values():
            cond = rule.get("RuleCondition")
            if cond is not None and not evaluate_condition(t, cond, params):
                continue
            for a in as_list(rule.get("Assertions")):
                try:
                    if not evaluate_condition(t, a.get("Assert"), params):
                        return True
                except (ValueError, KeyError):
                    continue
        return False

    problems = []
    if not refused({"CacheType": "serverless", "CacheAuthMode": "token"}):
        problems.append("no Rule refuses CacheType serverless with CacheAuthMode token")
    for variant in VARIANTS:
        if refused(variant):
            problems.append(f"the Rules refuse {variant}, a variant the stack supports")
    return problems


def check_serverless_cache(t: dict) -> list[str]:
    """CacheType serverless creates an ElastiCache Serverless cache (Valkey 8) instead of the
    replication group and what only it has: in the private subnets and the cache's security
    group, on the IAM user group, within usage limits from the parameters, without snapshots
    (derived data) and under the AWS managed key. CacheType nodes creates no serverless cache."""
    problems = []
    nodes = deployed(t, {"CacheType": "nodes"})["Resources"]
    if SERVERLESS in nodes or CACHE not in nodes:
        problems.append(f"CacheType=nodes must create {CACHE} and no {SERVERLESS}")
    d = deployed(t, {"CacheType": "serverless", "CacheAuthMode": "iam"})
    res = d["Resources"]
    only_nodes = sorted(
        n for n, r in res.items()
        if r["Type"] in ("AWS::ElastiCache::ReplicationGroup", "AWS::ElastiCache::ParameterGroup",
                         "AWS::ElastiCache::SubnetGroup", "AWS::ElastiCache::CacheCluster")
    )
    if only_nodes:
        problems.append(f"CacheType=serverless still creates {only_nodes}")
    caches = [n for n, r in res.items() if r["Type"] == "AWS::ElastiCache::ServerlessCache"]
    if caches != [SERVERLESS]:
        return problems + [f"CacheType=serverless must create exactly {SERVERLESS}, creates {caches}"]
    p = props(d, SERVERLESS)
    where = f"CacheType=serverless: {SERVERLESS}"
    if p.get("Engine") != "valkey" or str(p.get("MajorEngineVersion")) != "8":
        problems.append(f"{where} must be valkey 8, is {p.get('Engine')!r} {p.get('MajorEngineVersion')!r}")
    # Its name is the replication group id's parameter: what the ARN in the roles, the
    # functions' REDIS_IAM_CACHE_NAME and the alarms' clusterId resolve to.
    if not is_ref(p.get("ServerlessCacheName"), "CacheReplicationGroupId"):
        problems.append(f"{where}.ServerlessCacheName must be !Ref CacheReplicationGroupId")
    if as_list(p.get("SecurityGroupIds")) != [{"Ref": "CacheSecurityGroup"}]:
        problems.append(f"{where}.SecurityGroupIds must be [!Ref CacheSecurityGroup]")
    subnets = props(t, "CacheSubnetGroup").get("SubnetIds")
    if not subnets or p.get("SubnetIds") != resolve_ifs(t, subnets, {"CacheType": "serverless"}):
        problems.append(f"{where}.SubnetIds must be the private subnets, as the subnet group's")
    if not is_ref(p.get("UserGroupId"), USER_GROUP):
        problems.append(f"{where}.UserGroupId must be !Ref {USER_GROUP} (IAM users, disabled default)")
    limits = p.get("CacheUsageLimits", {})
    storage, ecpu = limits.get("DataStorage", {}), limits.get("ECPUPerSecond", {})
    if not (is_ref(storage.get("Maximum"), "ServerlessMaxDataStorageGb") and storage.get("Unit") == "GB"):
        problems.append(f"{where}: DataStorage must be {{Maximum: !Ref ServerlessMaxDataStorageGb, Unit: GB}}")
    if not is_ref(ecpu.get("Maximum"), "ServerlessMaxEcpuPerSecond"):
        problems.append(f"{where}: ECPUPerSecond.Maximum must be !Ref ServerlessMaxEcpuPerSecond")
    # AWS's limits for the two: 1 to 5,000 GB, 1,000 to 15,000,000 ECPU/s.
    for name, low, high in (("ServerlessMaxDataStorageGb", 1, 5000), ("ServerlessMaxEcpuPerSecond", 1000, 15_000_000)):
        b = bounds(t, {"Ref": name}) if name in t.get("Parameters", {}) else None
        if b is None or b[0] < low or b[1] > high:
            problems.append(f"parameter {name} must stay within {low}..{high}, is {b}")
    if str(p.get("SnapshotRetentionLimit")) != "0":
        problems.append(f"{where}.SnapshotRetentionLimit must be 0: the cache is derived data")
    if "DailySnapshotTime" in p and str(p.get("SnapshotRetentionLimit")) == "0":
        problems.append(f"{where}.DailySnapshotTime without snapshots")
    if "KmsKeyId" in p:
        problems.append(f"{where}.KmsKeyId: the AWS managed key, as the replication group")
    if not p.get("Description"):
        problems.append(f"{where} needs a Description")
    read_replicas = str(t["Parameters"].get("CacheReadFromReplicas", {}).get("Description", ""))
    if "reader endpoint" not in read_replicas:
        problems.append("CacheReadFromReplicas must say that with a serverless cache it reads from the reader endpoint")
    return problems


# The alarms a serverless cache needs (metric -> statistic), on its own metrics: dimension
# clusterId = its name.
SERVERLESS_ALARMS = {
    "ThrottledCmds": "Sum",
    "ElastiCacheProcessingUnits": "Sum",
    "BytesUsedForCache": "Maximum",
    "Evictions": "Sum",
    "SuccessfulReadRequestLatency": "p99",
    "SuccessfulWriteRequestLatency": "p99",
}


def check_serverless_alarms(t: dict) -> list[str]:
    """With CacheType serverless: an alarm on each of the serverless cache's metrics above (by
    its clusterId), each with a description of what it means and what to do, and thresholds
    that fire where infra/README.md says (any throttled command, 80 % of the ECPU/s and storage
    limits, any eviction, p99 latency over a quarter of REDIS_TIMEOUT_MS); none of the node
    alarms (they would watch nodes that do not exist). With CacheType nodes, none of these."""
    problems = []
    d = deployed(t, {"CacheType": "serverless", "CacheAuthMode": "iam"})
    found: dict[str, list[tuple[str, dict]]] = {}
    for name, a in resources(d, "AWS::CloudWatch::Alarm").items():
        p = a["Properties"]
        text = json.dumps(p)
        if CACHE in referenced_names(p) or "CacheClusterId" in text:
            problems.append(f"CacheType=serverless: {name} watches the replication group's nodes")
        if "BatchesUnderReplicated" in text:
            problems.append(f"CacheType=serverless: {name} on BatchesUnderReplicated: nothing confirms replicas there")
        watched = [p] + list(_math_metrics(p).values()) if "MetricName" in p else list(_math_metrics(p).values())
        stats = {m["Id"]: m["MetricStat"].get("Stat") for m in as_list(p.get("Metrics")) if isinstance(m, dict) and "MetricStat" in m}
        for m in watched:
            if m.get("Namespace") != "AWS/ElastiCache":
                continue
            dims = {x.get("Name"): x.get("Value") for x in as_list(m.get("Dimensions"))}
            if dims != {"clusterId": {"Ref": SERVERLESS}}:
                problems.append(f"CacheType=serverless: {name} watches {m.get('MetricName')} by {dims}, not clusterId = {SERVERLESS}")
                continue
            stat = p.get("Statistic") or p.get("ExtendedStatistic") if m is p else next(
                (stats[i] for i, mm in _math_metrics(p).items() if mm is m), None)
            found.setdefault(m.get("MetricName"), []).append((name, {**p, "_stat": stat}))
    for metric, stat in SERVERLESS_ALARMS.items():
        alarms = found.get(metric, [])
        if not alarms:
            problems.append(f"CacheType=serverless: no alarm on the serverless cache's {metric}")
        for name, p in alarms:
            if p["_stat"] != stat:
                problems.append(f"{name}: {metric} by {p['_stat']!r}, must be {stat!r}")
            if len(str(p.get("AlarmDescription", ""))) < 120:
                problems.append(f"{name} must describe what it means and what to do")
            # As every alarm: AlarmTopicArn when it is set (!If HasAlarmTopic).
            actions = props(t, name).get("AlarmActions")
            if resolve_ifs(t, actions, {"AlarmTopicArn": "arn:aws:sns:x"}) != [{"Ref": "AlarmTopicArn"}]:
                problems.append(f"{name} does not notify AlarmTopicArn")
    problems += _serverless_thresholds(t, found)
    nodes = deployed(t, {"CacheType": "nodes"})
    for name, a in resources(nodes, "AWS::CloudWatch::Alarm").items():
        if SERVERLESS in referenced_names(a["Properties"]):
            problems.append(f"CacheType=nodes: {name} watches the serverless cache")
    return problems


def _serverless_thresholds(t: dict, found: dict[str, list[tuple[str, dict]]]) -> list[str]:
    """Where each serverless alarm fires, on sample values (its metric math evaluated with the
    parameters' defaults)."""
    params = t["Parameters"]
    limit_ecpu = float(params.get("ServerlessMaxEcpuPerSecond", {}).get("Default", 0) or 0)
    limit_gb = float(params.get("ServerlessMaxDataStorageGb", {}).get("Default", 0) or 0)
    timeout_ms = float(params.get("RedisTimeoutMs", {}).get("Default", 0) or 0)
    # metric -> [(its value for one period, must breach)]
    samples = {
        "ThrottledCmds": [(1, True), (0, False)],
        "Evictions": [(1, True), (0, False)],
        # ECPUs consumed in a minute: 85 % and 75 % of the limit's per-second rate.
        "ElastiCacheProcessingUnits": [(0.85 * limit_ecpu * 60, True), (0.75 * limit_ecpu * 60, False)],
        "BytesUsedForCache": [(0.85 * limit_gb * 1e9, True), (0.75 * limit_gb * 1e9, False)],
        # Microseconds: 30 % and 20 % of REDIS_TIMEOUT_MS.
        "SuccessfulReadRequestLatency": [(0.30 * timeout_ms * 1000, True), (0.20 * timeout_ms * 1000, False)],
        "SuccessfulWriteRequestLatency": [(0.30 * timeout_ms * 1000, True), (0.20 * timeout_ms * 1000, False)],
    }
    problems = []
    for metric, cases in samples.items():
        for name, p in found.get(metric, []):
            rendered = render(t, {k: v for k, v in p.items() if k != "_stat"})
            for value, want in cases:
                try:
                    if "MetricName" in rendered:
                        got = _breaches(rendered, value)
                    else:
                        ids = {i: value for i in _math_metrics(rendered)}
                        got = _breaches(rendered, _math_value(rendered, ids))
                except (ValueError, KeyError, TypeError, NameError, ZeroDivisionError) as e:
                    problems.append(f"{name}: cannot evaluate ({e})")
                    break
                if got != want:
                    problems.append(f"{name} {'does not fire' if want else 'fires'} at {metric} = {value:g}")
            if p.get("TreatMissingData") == "breaching":
                problems.append(f"{name}: missing data must not breach (a quiet cache publishes little)")
    return problems


def deployed(t: dict, params: dict[str, str]) -> dict:
    """The template as CloudFormation deploys it for these parameters: resources and outputs
    whose Condition is false left out, every Fn::If resolved, AWS::NoValue removed."""
    out = {k: v for k, v in t.items() if k not in ("Resources", "Outputs")}
    for section in ("Resources", "Outputs"):
        out[section] = {
            name: resolve_ifs(t, {k: v for k, v in r.items() if k != "Condition"}, params)
            for name, r in t.get(section, {}).items()
            if not isinstance(r.get("Condition"), str) or evaluate_condition(t, r["Condition"], params)
        }
    return out


def readme_acl() -> str:
    """The functions' ACL rules as docs/deploying.md documents them (a unit test in
    crates/product-cache/src/acl.rs keeps that line equal to the code's)."""
    text = (REPO / "docs" / "deploying.md").read_text()
    section = text.split("### Redis permissions", 1)[1]
    return next(line for line in section.splitlines() if line.startswith("resetkeys "))


def _tokens(access: Any) -> list[str]:
    return str(access).split() if isinstance(access, str) else []


def readme_inspector_acl() -> str:
    """The inspector's ACL rules as docs/operating.md documents them (a unit test in
    crates/product-cache/src/acl.rs keeps that line equal to `acl::inspector_rules`, and the
    integration tests run the inspector as a user with exactly these rules)."""
    text = (REPO / "docs" / "operating.md").read_text()
    section = text.split("**The inspector.**", 1)[1]
    return next(line for line in section.splitlines() if line.startswith("resetkeys "))


def inspector_access_problems(access: Any) -> list[str]:
    """The inspector's user has docs/operating.md's inspector rules: the functions' plus RANDOMKEY."""
    want = "on " + readme_inspector_acl()
    problems = []
    if access != want:
        problems.append(f"{INSPECTOR_USER}.AccessString must be {want!r}, is {access!r}")
    if not set(_tokens(readme_acl())) < set(_tokens(want)) or "+randomkey" in _tokens(readme_acl()):
        problems.append("docs/operating.md's inspector rules must be the functions' plus +randomkey, which the functions lack")
    return problems


def check_auth_modes(t: dict) -> list[str]:
    """CacheAuthMode token (the default): the AUTH token from Secrets Manager, and nothing of IAM
    authentication. iam: an IAM-enabled user with the functions' ACL in a user group whose only
    other member is a disabled default user, the replication group on that group without an AUTH
    token, elasticache:Connect on the replication group and the user (nothing wider) in both
    roles, the functions told the user and the group, and no secret, endpoint or grant for one.
    With CacheType serverless (iam only, check_serverless_requires_iam) the same users and group
    on the serverless cache, and Connect on it instead of the replication group."""
    param = t.get("Parameters", {}).get("CacheAuthMode", {})
    if set(param.get("AllowedValues", [])) != set(AUTH_MODES) or param.get("Default") != "token":
        return ["parameter CacheAuthMode must allow token and iam, default token"]
    problems = []
    for variant in VARIANTS:
        mode, cache_type = variant["CacheAuthMode"], variant["CacheType"]
        d = deployed(t, variant)
        res = d["Resources"]
        cache_name = CACHE_OF[cache_type]
        cache = props(d, cache_name)
        users = {n: r.get("Properties", {}) for n, r in res.items() if r["Type"] == "AWS::ElastiCache::User"}
        groups = {n: r.get("Properties", {}) for n, r in res.items() if r["Type"] == "AWS::ElastiCache::UserGroup"}
        secrets = [n for n, r in res.items() if r["Type"] == "AWS::SecretsManager::Secret"]
        sm_endpoints = [
            n for n, r in res.items() if r["Type"] == "AWS::EC2::VPCEndpoint"
            and str(r["Properties"].get("ServiceName", {}).get("Fn::Sub", "")).endswith(".secretsmanager")
        ]
        grants: dict[str, list[dict]] = {}
        for fn in EXPECTED_BINARIES:
            role, statements, _ = role_statements(d, fn)
            grants[fn] = statements
        envs = {fn: props(d, fn).get("Environment", {}).get("Variables", {}) for fn in EXPECTED_BINARIES}
        acts = lambda fn: {a for s_ in grants[fn] for a in actions_of(s_)}  # noqa: E731
        where = f"CacheAuthMode={mode}" + (f", CacheType={cache_type}" if cache_type != "nodes" else "")
        if not cache:
            problems.append(f"{where}: no {cache_name}")
            continue
        iam_variables = {"REDIS_IAM_USER", "REDIS_IAM_CACHE_NAME", "REDIS_IAM_REPLICATION_GROUP"}
        if mode == "token":
            if "UserGroupIds" in cache:
                problems.append(f"{where}: {CACHE} must not use a user group")
            if users or groups:
                problems.append(f"{where}: creates ElastiCache users or groups {sorted(users) + sorted(groups)}")
            for fn in EXPECTED_BINARIES:
                if [a for a in acts(fn) if a.lower().startswith("elasticache:")]:
                    problems.append(f"{where}: {fn} may use elasticache actions")
                if iam_variables & set(envs[fn]):
                    problems.append(f"{where}: {fn} is given REDIS_IAM_* variables")
            continue
        # ---- iam mode
        if "AuthToken" in cache:
            problems.append(f"{where}: {cache_name} keeps an AuthToken")
        # A serverless cache is always TLS (it has no such property; check_environment checks
        # the functions connect with rediss://).
        if cache_type == "nodes" and cache.get("TransitEncryptionEnabled") is not True:
            problems.append(f"{where}: IAM authentication needs TLS")
        if secrets or sm_endpoints:
            problems.append(f"{where}: still creates {secrets + sm_endpoints}")
        https_in_vpc = [
            n for n, direction, rule in _sg_rules(d)
            if direction == "egress" and rule.get("FromPort") == 443 and is_ref(rule.get("CidrIp"), "VpcCidr")
        ]
        if https_in_vpc:
            problems.append(f"{where}: no endpoint needs {https_in_vpc} (443 inside the VPC)")
        # A replication group takes a list of user groups, a serverless cache one.
        group_key = {"nodes": "UserGroupIds", "serverless": "UserGroupId"}[cache_type]
        group_refs = as_list(cache.get(group_key))
        if len(group_refs) != 1 or not is_ref(group_refs[0], USER_GROUP) or USER_GROUP not in groups:
            want = f"[!Ref {USER_GROUP}]" if cache_type == "nodes" else f"!Ref {USER_GROUP}"
            problems.append(f"{where}: {cache_name}.{group_key} must be {want}")
            continue
        group = groups[USER_GROUP]
        if group.get("Engine") != cache.get("Engine"):
            problems.append(f"{where}: {USER_GROUP}.Engine differs from the cache's")
        members = as_list(group.get("UserIds"))
        for m in members:
            # A literal id could be the built-in "default": enabled, full access, no password.
            if not (isinstance(m, dict) and m.get("Ref") in users):
                problems.append(f"{where}: {USER_GROUP} member {m!r} is not a user of this stack")
        member_names = [m["Ref"] for m in members if isinstance(m, dict) and m.get("Ref") in users]
        for u in (IAM_USER, INSPECTOR_USER):
            if u not in member_names:
                problems.append(f"{where}: {u} is not in {USER_GROUP}")
        if not [u for u in member_names if users[u].get("UserName") == "default"]:
            problems.append(f"{where}: {USER_GROUP} needs a (disabled) user named default")
        for u in member_names:
            p = users[u]
            if p.get("Engine") != cache.get("Engine"):
                problems.append(f"{where}: {u}.Engine differs from the cache's")
            if u in (IAM_USER, INSPECTOR_USER):
                continue
            access = _tokens(p.get("AccessString"))
            if "off" not in access or "on" in access or any(x.startswith(("+", "~", "&")) and x != "~" for x in access):
                problems.append(f"{where}: {u} must be off, without keys or commands: {p.get('AccessString')!r}")
        for u in (IAM_USER, INSPECTOR_USER):
            iam = users.get(u, {})
            if iam.get("AuthenticationMode", {}).get("Type") != "iam":
                problems.append(f"{where}: {u} must authenticate with IAM")
            if iam.get("UserName") != iam.get("UserId"):
                problems.append(f"{where}: {u}'s UserName must equal its UserId (IAM users)")
        functions_access = users.get(IAM_USER, {}).get("AccessString")
        if functions_access != "on " + readme_acl():
            problems.append(f"{where}: {IAM_USER}.AccessString must be 'on ' + docs/deploying.md's ACL rules, is {functions_access!r}")
        problems += [f"{where}: {p_}" for p_ in inspector_access_problems(users.get(INSPECTOR_USER, {}).get("AccessString"))]
        for fn in EXPECTED_BINARIES:
            connect = [s_ for s_ in grants[fn] if "elasticache:Connect" in actions_of(s_)]
            if not connect:
                problems.append(f"{where}: {fn}'s role lacks elasticache:Connect")
            for s_ in connect:
                problems += [f"{where}: {p_}" for p_ in _connect_problems(fn, s_, CACHE_USER_OF[fn], cache_type)]
                problems += [f"{where}: {p_}" for p_ in wildcard_problems(fn, s_)]
            if [a for a in acts(fn) if a.lower().startswith("secretsmanager:")]:
                problems.append(f"{where}: {fn} may still read secrets")
            env = envs[fn]
            if "REDIS_AUTH_SECRET_ARN" in env:
                problems.append(f"{where}: {fn} still gets REDIS_AUTH_SECRET_ARN")
            if not is_ref(env.get("REDIS_IAM_USER"), CACHE_USER_OF[fn]):
                problems.append(f"{where}: {fn}: REDIS_IAM_USER must be !Ref {CACHE_USER_OF[fn]}")
            # The cache the token is signed for, under its new name for both types (the functions
            # still read REDIS_IAM_REPLICATION_GROUP, but refuse both).
            if not is_ref(env.get("REDIS_IAM_CACHE_NAME"), cache_name):
                problems.append(f"{where}: {fn}: REDIS_IAM_CACHE_NAME must be !Ref {cache_name}")
            if "REDIS_IAM_REPLICATION_GROUP" in env:
                problems.append(f"{where}: {fn}: REDIS_IAM_REPLICATION_GROUP beside REDIS_IAM_CACHE_NAME (refused)")
    return problems


def check_checkov_skips(t: dict) -> list[str]:
    """Every skipped checkov finding names its check and says why, in a sentence or more."""
    problems = []
    for name, r in resources(t).items():
        for skip in as_list((r.get("Metadata") or {}).get("checkov", {}).get("skip")):
            if not re.fullmatch(r"CKV2?_AWS_\d+", str(skip.get("id", ""))):
                problems.append(f"{name}: checkov skip without a check id: {skip}")
            if len(str(skip.get("comment", "")).strip()) < 40:
                problems.append(f"{name}: checkov skip {skip.get('id')} without a real reason")
    return problems


# ---- metrics, the inspector, alarms on the functions' metrics, the dashboard ----------------------

# What each function emits (the `Function` dimension -> metric names), as the code defines them in
# crates/product-cache/src/metrics.rs; `emitted_metrics_in_code` reads
# them back from there (every recorder of each function) so this list cannot drift.
EMITTED = {
    "read": {
        "Hits", "Misses", "Bypasses", "BreakerBypasses", "LeaseWaits", "LeaseWaitTime", "RefusedFills",
        "InvalidRequests", "BatchReads", "BatchSize",
    },
    "invalidator": {
        "BatchSize", "RecordsApplied", "RecordsRefusedAsOlder", "RecordsSkippedMalformed",
        "RecordsFailed", "InvalidationLag", "BatchesUnderReplicated", "BatchesEvictionGuardBlind",
    },
    "inspector": {
        # The sample's (scheduled runs and {"ids": [...]} invocations)...
        "KeysChecked", "InconsistentKeys", "KeysSettled", "KeysRepaired",
        # ...and the change monitor's (stream batches): a recorder of its own, so each line
        # carries one path's metrics and KeysChecked, the heartbeat, comes from runs only.
        "ChangesChecked", "ChangesInconsistent", "ChangesPending", "ChangesSuperseded",
        "ChangesUnchecked", "PendingChangeAge",
    },
}
METRICS_NS = "MetricsNamespace"
INSPECT_VARIABLES = {
    "INSPECT_SAMPLE": "InspectorSampleSize",
    "INSPECT_GRACE_MS": "InspectorGraceMs",
    "INSPECT_REPAIR": "InspectorRepair",
    "MONITOR_SHARE": MONITOR_SHARE_PARAM,
}
INTERVALS = "InspectorIntervals"
# The inspector's reserved concurrency: the parameter, and the condition that applies it.
INSPECTOR_RESERVATION = "InspectorReservedConcurrency"
INSPECTOR_RESERVATION_CONDITION = "ReserveInspectorConcurrency"
# The invalidator mapping's ParallelizationFactor, as the inspector is told it.
FACTOR_VARIABLE = "INVALIDATOR_PARALLELIZATION_FACTOR"


RUST_SRC = REPO / "crates/product-cache/src"


def rust_sources() -> dict[Path, str]:
    """The library's Rust sources, path -> text: what `emitted_metrics_in_code` reads."""
    return {path: path.read_text() for path in RUST_SRC.rglob("*.rs")}


def emitted_metrics_in_code(files: dict[Path, str] | None = None) -> dict[str, set[str]]:
    """Function dimension -> metric names, from the Rust sources (`files`, default the
    library's): the union over every recorder of that function (the inspector has two, its
    sample's and its change monitor's)."""
    out: dict[str, set[str]] = {}
    for function, metrics in recorders_in_code(files):
        out.setdefault(function, set()).update(metrics)
    return out


def recorders_in_code(files: dict[Path, str] | None = None) -> list[tuple[str, set[str]]]:
    """(function dimension, metric names) of each recorder in the Rust sources (`files`, default
    the library's): every `Recorder::off("<fn>", &<module path>::<ARRAY>)`, the array's members
    (constants of that module, or `alias::NAME` of a module the array's block `use`s as alias),
    each one's `count("..")` / `millis("..")` / `sizes("..")` name. Each recorder writes its own
    lines. A recorder whose array or members cannot be resolved raises, rather than leaving its
    metrics out unnoticed."""
    src = RUST_SRC
    files = rust_sources() if files is None else files

    def module_body(path: list[str], here: Path) -> str:
        """The body of the module a path names, seen from the file `here`: `a::b` is module b
        of src/a.rs (or src/a/mod.rs), a lone `b` is module b of `here` itself."""
        path = [seg for seg in path if seg not in ("crate", "self")]
        candidates = [here] if len(path) == 1 else [src / f"{path[0]}.rs", src / path[0] / "mod.rs"]
        for file in candidates:
            m = re.search(r"pub mod %s \{(.*?)\n\}" % re.escape(path[-1]), files.get(file, ""), re.S)
            if m:
                return m.group(1)
        return ""

    def names(body: str) -> dict[str, str]:
        return dict(re.findall(r'const (\w+): Metric = Metric::(?:count|millis|sizes)\("(\w+)"\)', body))

    out: list[tuple[str, set[str]]] = []
    for here, text in sorted(files.items()):
        calls = re.findall(r"Recorder::off\(", text)
        found = re.findall(r'Recorder::off\(\s*"(\w+)",\s*&([\w:]+),?\s*\)', text)
        if len(found) != len(calls):
            raise ValueError(f"{here}: a Recorder::off call not of the form (\"<fn>\", &<path>::<ARRAY>)")
        for function, path in found:
            *module, array = path.split("::")
            body = module_body(module, here)
            m = re.search(r"const %s: \[Metric; (\d+)\] = (\{.*?\n\s*\};|\[.*?\];)" % re.escape(array), body, re.S)
            if not m:
                raise ValueError(f"{here}: Recorder::off({function!r}, &{path}): no such array of metrics")
            size, definition = int(m.group(1)), m.group(2)
            aliases = {alias: target.split("::") for target, alias in re.findall(r"use ([\w:]+) as (\w+);", definition)}
            own = names(body)
            members = re.sub(r"use [\w:]+ as \w+;", "", definition)
            metrics = set()
            for alias, const in re.findall(r"\b(?:(\w+)::)?([A-Z][A-Z0-9_]+)\b", members):
                table = names(module_body(aliases[alias], here)) if alias in aliases else own
                if const in table:
                    metrics.add(table[const])
            if len(metrics) != size:
                raise ValueError(f"{here}: {path} holds {size} metrics, {len(metrics)} resolved ({sorted(metrics)})")
            out.append((function, metrics))
    return out


def metrics_read_by_template(t: dict) -> dict[str, set[str]]:
    """Function dimension -> the names of the functions' own metrics (MetricsNamespace) that the
    template's alarms (single-metric and metric math) and dashboard read."""
    out: dict[str, set[str]] = {}
    for a in resources(t, "AWS::CloudWatch::Alarm").values():
        p = a.get("Properties", {})
        for m in [p] + list(_math_metrics(p).values()):
            if is_ref(m.get("Namespace"), METRICS_NS) and m.get("MetricName"):
                dims = {d.get("Name"): d.get("Value") for d in as_list(m.get("Dimensions"))}
                out.setdefault(str(dims.get("Function")), set()).add(m["MetricName"])
    ns = str(t.get("Parameters", {}).get(METRICS_NS, {}).get("Default"))
    for _, text in dashboard_bodies(t):
        try:
            body = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            continue  # check_dashboard reports it
        for w in body.get("widgets", []):
            if w.get("type") != "metric":
                continue
            for values, _ in _metric_rows(w):
                if len(values) >= 2 and values[0] == ns:
                    dims = dict(zip(values[2::2], values[3::2]))
                    out.setdefault(str(dims.get("Function")), set()).add(values[1])
    return out


def unemitted_metrics(t: dict, emitted: dict[str, set[str]]) -> list[str]:
    """Metrics the template alarms on or graphs that the code (as `emitted`) does not emit."""
    return [
        f"the template reads {fn} {metric}, which the code does not emit"
        for fn, metrics in sorted(metrics_read_by_template(t).items())
        for metric in sorted(metrics - emitted.get(fn, set()))
    ]


def _env(t: dict, function: str) -> dict:
    return props(t, function).get("Environment", {}).get("Variables", {}) or {}


def _interval_seconds(node: Any) -> bool:
    """!FindInMap [InspectorIntervals, !Ref InspectorIntervalMinutes, Seconds]"""
    return node == {"Fn::FindInMap": [INTERVALS, {"Ref": "InspectorIntervalMinutes"}, "Seconds"]}


def check_metrics_environment(t: dict) -> list[str]:
    """All three functions write their metrics to MetricsNamespace with Service = the stack name,
    which is what the alarms and the dashboard read; the namespace cannot be `off`."""
    problems = []
    for fn in EXPECTED_BINARIES:
        env = _env(t, fn)
        if not is_ref(env.get("METRICS_SERVICE"), "AWS::StackName"):
            problems.append(f"{fn}: METRICS_SERVICE must be !Ref AWS::StackName")
        if not is_ref(env.get("METRICS_NAMESPACE"), METRICS_NS):
            problems.append(f"{fn}: METRICS_NAMESPACE must be !Ref {METRICS_NS}")
    param = t.get("Parameters", {}).get(METRICS_NS, {})
    pattern = param.get("AllowedPattern")
    if param.get("Default") != "ProductCache":
        problems.append(f"{METRICS_NS} must default to ProductCache (the code's default)")
    if not pattern:
        problems.append(f"{METRICS_NS} needs an AllowedPattern")
    else:
        for value, ok in (("ProductCache", True), ("off", False), ("OFF", False), ("AWS/Lambda", False), ("", False)):
            if bool(re.fullmatch(pattern, value)) != ok:
                problems.append(f"{METRICS_NS} pattern {'rejects' if ok else 'accepts'} {value!r}")
    return problems


def _invalidator_factor(t: dict) -> Any:
    """The ParallelizationFactor of the invalidator's stream event (None when it has not one)."""
    streams = [e.get("Properties", {}) for e in (props(t, INVALIDATOR).get("Events") or {}).values()
               if e.get("Type") == "DynamoDB"]
    return streams[0].get("ParallelizationFactor") if len(streams) == 1 else None


def check_inspector(t: dict) -> list[str]:
    """The inspector runs on a schedule whose interval is also its alarms' period, sees the
    cache and the table exactly as the read function does (same variables and values; its own
    cache user in iam mode), is told the invalidator mapping's parallelization factor, has time
    for two grace periods, and reserves no concurrency unless asked to (its condition applies
    the parameter)."""
    p = props(t, INSPECTOR)
    if not p:
        return [f"no {INSPECTOR}"]
    problems = []
    schedules = [e.get("Properties", {}) for e in (p.get("Events") or {}).values() if e.get("Type") == "Schedule"]
    if len(schedules) != 1:
        problems.append(f"{INSPECTOR} must have exactly one Schedule event")
    elif schedules[0].get("Schedule") != {"Fn::FindInMap": [INTERVALS, {"Ref": "InspectorIntervalMinutes"}, "Rate"]}:
        problems.append(f"{INSPECTOR} schedule must come from {INTERVALS} by InspectorIntervalMinutes")
    if [e for e in (p.get("Events") or {}).values() if e.get("Type") != "Schedule"]:
        problems.append(f"{INSPECTOR} must have no other event source")
    intervals = t.get("Mappings", {}).get(INTERVALS, {})
    allowed = t.get("Parameters", {}).get("InspectorIntervalMinutes", {}).get("AllowedValues", [])
    if {str(v) for v in allowed} != set(intervals) or not allowed:
        problems.append(f"InspectorIntervalMinutes AllowedValues {allowed} must be the keys of {INTERVALS}")
    for minutes, row in intervals.items():
        unit = "minute" if minutes == "1" else "minutes"
        if row.get("Rate") != f"rate({minutes} {unit})" or row.get("Seconds") != 60 * int(minutes):
            problems.append(f"{INTERVALS}[{minutes}] is {row}, must be rate({minutes} {unit}) and {60 * int(minutes)} s")
    # The read function's environment, unchanged, plus INSPECT_* and (iam mode) its own user.
    for mode in AUTH_MODES:
        d = deployed(t, {"CacheAuthMode": mode})
        read_env, env = _env(d, READ), dict(_env(d, INSPECTOR))
        for var, param in INSPECT_VARIABLES.items():
            if not is_ref(env.pop(var, None), param):
                problems.append(f"{INSPECTOR}: {var} must be !Ref {param}")
        # Above 1 the change monitor must not infer the invalidator's progress from a shard's
        # order: the inspector is told the factor the invalidator's mapping really has.
        factor, invalidator_factor = env.pop(FACTOR_VARIABLE, None), _invalidator_factor(d)
        if factor is None or factor != invalidator_factor:
            problems.append(
                f"CacheAuthMode={mode}: {INSPECTOR} {FACTOR_VARIABLE} is {factor!r}, must be the invalidator "
                f"mapping's ParallelizationFactor ({invalidator_factor!r})"
            )
        want = dict(read_env)
        if mode == "iam":
            want["REDIS_IAM_USER"] = {"Ref": INSPECTOR_USER}
        for var in sorted(set(want) | set(env)):
            if want.get(var) != env.get(var):
                problems.append(
                    f"CacheAuthMode={mode}: {INSPECTOR} {var} is {env.get(var)!r}, must be {want.get(var)!r} (the read function's)"
                )
    if t.get("Parameters", {}).get("InspectorRepair", {}).get("Default") != "false":
        problems.append("InspectorRepair must default to false (findings are looked at before anything is deleted)")
    grace = t.get("Parameters", {}).get("InspectorGraceMs", {})
    timeout = p.get("Timeout")
    # A change monitor batch waits until its newest change is the grace period + 1 s old (record
    # times are whole seconds), does its reads, and looks again one grace period later at a
    # change found inconsistent on the shard's progress alone.
    if "MaxValue" not in grace or not isinstance(timeout, int) or timeout * 1000 < 2 * float(grace["MaxValue"]) + 1_000 + 20_000:
        problems.append(f"{INSPECTOR}.Timeout {timeout} s must exceed twice the longest InspectorGraceMs + 1 s by 20 s (the reads, a cold start)")
    problems += _inspector_reservation_problems(t)
    return problems


def _inspector_reservation_problems(t: dict) -> list[str]:
    """No reservation by default: every stream shard's change monitor batch holds an inspector
    slot for at least a grace period, so a small reservation throttles the monitor. A number
    (up to a bound) reserves that many, through the condition that is false for -1 only."""
    problems = []
    param = t.get("Parameters", {}).get(INSPECTOR_RESERVATION, {})
    if param.get("Type") != "Number" or str(param.get("Default")) != "-1":
        problems.append(f"{INSPECTOR_RESERVATION} must be a Number defaulting to -1 (no reservation: the change "
                        "monitor runs a batch per stream shard at once, each holding its slot for a grace period)")
    if "AllowedValues" in param or str(param.get("MinValue")) != "-1" or "MaxValue" not in param:
        problems.append(f"{INSPECTOR_RESERVATION} must take -1 or a number up to a MaxValue (MinValue -1, no AllowedValues)")
    elif float(param["MaxValue"]) < 100:
        problems.append(f"{INSPECTOR_RESERVATION} MaxValue {param['MaxValue']} leaves no room for a stream of many shards")
    want = {"Fn::If": [INSPECTOR_RESERVATION_CONDITION, {"Ref": INSPECTOR_RESERVATION}, {"Ref": "AWS::NoValue"}]}
    if props(t, INSPECTOR).get("ReservedConcurrentExecutions") != want:
        problems.append(f"{INSPECTOR}.ReservedConcurrentExecutions must be !If [{INSPECTOR_RESERVATION_CONDITION}, "
                        f"!Ref {INSPECTOR_RESERVATION}, !Ref AWS::NoValue]")
    try:
        applies = {v: evaluate_condition(t, INSPECTOR_RESERVATION_CONDITION, {INSPECTOR_RESERVATION: v})
                   for v in ("-1", "1", "8", str(param.get("MaxValue", 1000)))}
    except (KeyError, ValueError) as e:
        return problems + [f"condition {INSPECTOR_RESERVATION_CONDITION} cannot be evaluated ({e!r})"]
    if applies != {"-1": False, "1": True, "8": True, str(param.get("MaxValue", 1000)): True}:
        problems.append(f"{INSPECTOR_RESERVATION_CONDITION} must hold for every {INSPECTOR_RESERVATION} but -1, holds {applies}")
    return problems


def _stream_readers(t: dict) -> list[str]:
    """Everything that reads the table's stream: SAM DynamoDB events and event source mappings."""
    readers = []
    for name, r in resources(t).items():
        if r.get("Type") == "AWS::Serverless::Function":
            for event, e in (r.get("Properties", {}).get("Events") or {}).items():
                if e.get("Type") == "DynamoDB":
                    readers.append(f"{name}.Events.{event}")
        elif r.get("Type") == "AWS::Lambda::EventSourceMapping":
            arn = r.get("Properties", {}).get("EventSourceArn")
            if any(is_getatt(b, TABLE, "StreamArn") or is_ref(b, "ExistingTableStreamArn") for b in if_branches(arn)):
                readers.append(name)
    return readers


def check_change_monitor(t: dict) -> list[str]:
    """The change monitor: the inspector on the table's stream through a mapping of its own, the
    stream's second and last reader, with the settings the monitor is built for (LATEST, batches
    of up to 1,000 gathered for 10 s, one at a time per shard, two retries, an hour's record age,
    no bisecting and no partial batch responses). ChangeMonitor (default enabled) switches the
    mapping and the role's stream grant together; MONITOR_SHARE only takes what the code accepts."""
    problems = []
    params = t.get("Parameters", {})
    switch = params.get(MONITOR_PARAM, {})
    if set(switch.get("AllowedValues", [])) != {"enabled", "disabled"} or switch.get("Default") != "enabled":
        problems.append(f"parameter {MONITOR_PARAM} must allow enabled and disabled, default enabled")
    share = params.get(MONITOR_SHARE_PARAM, {})
    pattern = share.get("AllowedPattern")
    if str(share.get("Default")) != "1":
        problems.append(f"{MONITOR_SHARE_PARAM} must default to 1 (every changed key, the code's default)")
    if not pattern:
        problems.append(f"{MONITOR_SHARE_PARAM} needs an AllowedPattern (MONITOR_SHARE is above 0 and at most 1)")
    else:
        for value, ok in (("1", True), ("1.0", True), ("0.5", True), ("0.01", True), ("0", False),
                          ("0.0", False), ("1.5", False), ("2", False), ("-1", False), ("", False), ("all", False)):
            if bool(re.fullmatch(pattern, value)) != ok:
                problems.append(f"{MONITOR_SHARE_PARAM} pattern {'rejects' if ok else 'accepts'} {value!r}")
    readers = _stream_readers(t)
    if len(readers) > MAX_STREAM_READERS:
        problems.append(f"the table's stream has {len(readers)} readers {readers}; DynamoDB Streams serves {MAX_STREAM_READERS} per shard")
    mappings = {
        n: r for n, r in resources(t, "AWS::Lambda::EventSourceMapping").items()
        if any(is_ref(f, INSPECTOR) or is_getatt(f, INSPECTOR, "Arn")
               for f in if_branches(r.get("Properties", {}).get("FunctionName")))
    }
    if len(mappings) != 1:
        return problems + [f"{INSPECTOR} needs exactly one event source mapping, has {sorted(mappings)}"]
    (name, mapping), = mappings.items()
    cond = mapping.get("Condition")
    try:
        on = isinstance(cond, str) and evaluate_condition(t, cond, {MONITOR_PARAM: "enabled"})
        off = isinstance(cond, str) and evaluate_condition(t, cond, {MONITOR_PARAM: "disabled"})
    except (KeyError, ValueError):
        on, off = False, True
    if not on or off:
        problems.append(f"{name} must exist exactly when {MONITOR_PARAM} is enabled (a Condition on it)")
    p = mapping.get("Properties", {})
    arn = p.get("EventSourceArn")
    if not (isinstance(arn, dict) and "Fn::If" in arn and arn["Fn::If"][0] == "CreateTable"
            and is_getatt(arn["Fn::If"][1], TABLE, "StreamArn") and is_ref(arn["Fn::If"][2], "ExistingTableStreamArn")):
        problems.append(f"{name} must read !If [CreateTable, ProductTable.StreamArn, ExistingTableStreamArn]")
    for key, want in MONITOR_SETTINGS.items():
        if p.get(key) != want:
            problems.append(f"{name}.{key} is {p.get(key)!r}, must be {want!r}")
    for key in ("FunctionResponseTypes", "DestinationConfig", "TumblingWindowInSeconds", "FilterCriteria"):
        if key in p:
            problems.append(f"{name} must not set {key} (the function never reports item failures or fails a batch)")
    if p.get("Enabled", True) is not True:
        problems.append(f"{name} is disabled; {MONITOR_PARAM}=disabled is the switch")
    # The role's stream grant exists with the mapping and only with it.
    for value, want in (("enabled", True), ("disabled", False)):
        d = deployed(t, {MONITOR_PARAM: value})
        role, statements, _ = role_statements(d, INSPECTOR)
        granted = {a for s_ in statements for a in actions_of(s_)} & STREAM_READ_ACTIONS
        if want and granted != STREAM_READ_ACTIONS:
            problems.append(f"{MONITOR_PARAM}={value}: {role} lacks {sorted(STREAM_READ_ACTIONS - granted)} (the mapping would fail)")
        if not want and granted:
            problems.append(f"{MONITOR_PARAM}={value}: {role} keeps {sorted(granted)} without a mapping")
    return problems


def _alarm_on(t: dict, function: str, metric: str) -> list[tuple[str, dict]]:
    """Alarms on one of the functions' own metrics (single metric, not math)."""
    out = []
    for name, a in resources(t, "AWS::CloudWatch::Alarm").items():
        p = a.get("Properties", {})
        dims = {d.get("Name"): d.get("Value") for d in as_list(p.get("Dimensions"))}
        if (p.get("MetricName") == metric and is_ref(p.get("Namespace"), METRICS_NS)
                and dims == {"Service": {"Ref": "AWS::StackName"}, "Function": function}):
            out.append((name, p))
    return out


def _math_metrics(p: dict) -> dict[str, dict]:
    """id -> the MetricStat.Metric of each metric in an alarm's Metrics."""
    return {
        m["Id"]: m["MetricStat"]["Metric"]
        for m in as_list(p.get("Metrics")) if isinstance(m, dict) and "MetricStat" in m
    }


def evaluate_expression(expression: str, values: dict[str, float]) -> float:
    """A metric math expression of the kind the alarms use (arithmetic, comparisons, IF and
    FILL) on one data point per metric."""
    if not re.fullmatch(r"[\w\s.+\-*/()<>=!,]*", expression):
        raise ValueError(f"unsupported expression {expression!r}")
    env = {"IF": lambda c, a, b: a if c else b, "FILL": lambda x, v: v if x is None else x, **values}
    return float(eval(expression, {"__builtins__": {}}, env))  # noqa: S307 (our own template)


def _math_value(p: dict, values: dict[str, float]) -> float:
    """The value an expression alarm compares with its threshold, for given metric values."""
    known = dict(values)
    expressions = [m for m in as_list(p.get("Metrics")) if isinstance(m, dict) and "Expression" in m]
    for _ in expressions:  # expressions may refer to each other, in any order
        for m in expressions:
            try:
                known[m["Id"]] = evaluate_expression(m["Expression"], known)
            except NameError:
                pass
    (returned,) = [m["Id"] for m in as_list(p.get("Metrics")) if isinstance(m, dict) and m.get("ReturnData")]
    return known[returned]


def _breaches(p: dict, value: float) -> bool:
    op, th = p.get("ComparisonOperator"), float(p.get("Threshold"))
    return {"GreaterThanThreshold": value > th, "GreaterThanOrEqualToThreshold": value >= th,
            "LessThanThreshold": value < th, "LessThanOrEqualToThreshold": value <= th}[op]


def check_metric_alarms(t: dict) -> list[str]:
    """The alarms on the functions' own metrics keep the thresholds and the missing-data
    treatment infra/README.md documents, and watch only metrics the functions emit."""
    problems = []
    params = t.get("Parameters", {})

    def one(function: str, metric: str) -> dict:
        found = _alarm_on(t, function, metric)
        if len(found) != 1:
            problems.append(f"need exactly one alarm on {function} {metric}, found {[n for n, _ in found]}")
            return {}
        return found[0][1]

    # Any inconsistency past the grace period, judged once per run interval.
    p = one("inspector", "InconsistentKeys")
    if p and not (p.get("Statistic") == "Sum" and _interval_seconds(p.get("Period"))
                  and p.get("ComparisonOperator") == "GreaterThanThreshold" and float(p.get("Threshold", -1)) == 0
                  and p.get("TreatMissingData") == "notBreaching"):
        problems.append("InconsistentKeys alarm must be Sum over the inspector's interval > 0, missing data not breaching")
    # Any change found inconsistent (pending ones are counted apart), judged per 5 minutes; the
    # alarm exists with the change monitor.
    p = one("inspector", "ChangesInconsistent")
    if p and not (p.get("Statistic") == "Sum" and int(p.get("Period", 0)) == 300
                  and int(p.get("EvaluationPeriods", 0)) == 1
                  and p.get("ComparisonOperator") == "GreaterThanThreshold" and float(p.get("Threshold", -1)) == 0
                  and p.get("TreatMissingData") == "notBreaching"):
        problems.append("ChangesInconsistent alarm must be Sum over 5 minutes > 0, missing data not breaching")
    for name, _ in _alarm_on(t, "inspector", "ChangesInconsistent"):
        cond = t["Resources"][name].get("Condition")
        if cond is not None and not evaluate_condition(t, cond, {MONITOR_PARAM: "enabled"}):
            problems.append(f"{name} must exist whenever the change monitor does")
    # An inspector that stops running must be noticed: a missing KeysChecked breaches, any
    # present data point (a run, even of 0 keys) does not.
    p = one("inspector", "KeysChecked")
    if p:
        present_ok = p.get("Statistic") == "SampleCount" and not _breaches(p, 1)
        if not (present_ok and p.get("TreatMissingData") == "breaching" and _interval_seconds(p.get("Period"))
                and int(p.get("EvaluationPeriods", 0)) >= 2
                and int(p.get("DatapointsToAlarm", p.get("EvaluationPeriods", 0))) == int(p.get("EvaluationPeriods", 0))):
            problems.append("KeysChecked heartbeat must breach on missing data only, over 2+ whole inspector intervals")
    # Invalidation lag p99 above a parameter whose default allows for the 1 s coarseness and
    # stays within the inspector's grace period.
    p = one("invalidator", "InvalidationLag")
    if p:
        lag = params.get("InvalidationLagAlarmMs", {})
        if not (p.get("ExtendedStatistic") == "p99" and is_ref(p.get("Threshold"), "InvalidationLagAlarmMs")
                and p.get("ComparisonOperator") == "GreaterThanThreshold" and p.get("TreatMissingData") == "notBreaching"):
            problems.append("InvalidationLag alarm must be p99 > InvalidationLagAlarmMs, missing data not breaching")
        if float(lag.get("MinValue", 0)) < 2000:
            problems.append("InvalidationLagAlarmMs may be below 2000 ms: values carry up to 1 s of rounding")
        if float(lag.get("Default", 1e9)) > float(params.get("InspectorGraceMs", {}).get("Default", 0)):
            problems.append("InvalidationLagAlarmMs default exceeds InspectorGraceMs: lag the inspector counts as inconsistency would not alarm as lag")
    p = one("invalidator", "RecordsSkippedMalformed")
    if p and not (p.get("Statistic") == "Sum" and float(p.get("Threshold", -1)) == 0
                  and p.get("ComparisonOperator") == "GreaterThanThreshold" and p.get("TreatMissingData") == "notBreaching"):
        problems.append("RecordsSkippedMalformed alarm must be Sum > 0, missing data not breaching")
    # A shard short of replicas for longer than a node replacement and its full sync take: any
    # under-replicated batch in every period of at least 30 minutes, quiet periods not breaching.
    p = one("invalidator", "BatchesUnderReplicated")
    if p and not (p.get("Statistic") == "Sum" and float(p.get("Threshold", -1)) == 0
                  and p.get("ComparisonOperator") == "GreaterThanThreshold" and p.get("TreatMissingData") == "notBreaching"
                  and int(p.get("DatapointsToAlarm", p.get("EvaluationPeriods", 0))) == int(p.get("EvaluationPeriods", 0))
                  and int(p.get("Period", 0)) * int(p.get("EvaluationPeriods", 0)) >= 1800):
        problems.append("BatchesUnderReplicated alarm must be Sum > 0 in every period of 30+ minutes, missing data not breaching")
    # The inspector's failures show at once, not only after the heartbeat's intervals.
    errors = [n for n, a in resources(t, "AWS::CloudWatch::Alarm").items()
              if a["Properties"].get("MetricName") == "Errors"
              and INSPECTOR in referenced_names(a["Properties"].get("Dimensions"))]
    if not errors:
        problems.append(f"no Errors alarm on {INSPECTOR}")

    # Bypass rate: Bypasses / (Hits + Misses + Bypasses) of the read function, above 5% for 3
    # of 5 minutes, missing data not breaching; minutes too quiet to judge do not breach.
    bypass = [
        (n, a["Properties"]) for n, a in resources(t, "AWS::CloudWatch::Alarm").items()
        if any(m.get("MetricName") == "Bypasses" for m in _math_metrics(a["Properties"]).values())
    ]
    if len(bypass) != 1:
        problems.append(f"need exactly one bypass-rate alarm, found {[n for n, _ in bypass]}")
    else:
        name, p = bypass[0]
        metrics = _math_metrics(p)
        by_name = {m.get("MetricName"): i for i, m in metrics.items()}
        if set(by_name) != {"Hits", "Misses", "Bypasses"}:
            problems.append(f"{name} must combine Hits, Misses and Bypasses, has {sorted(by_name)}")
        for i, m in metrics.items():
            dims = {d.get("Name"): d.get("Value") for d in as_list(m.get("Dimensions"))}
            if not is_ref(m.get("Namespace"), METRICS_NS) or dims != {"Service": {"Ref": "AWS::StackName"}, "Function": "read"}:
                problems.append(f"{name}: {i} is not the read function's metric of this stack")
        if set(by_name) == {"Hits", "Misses", "Bypasses"}:
            def rate(hits: float, misses: float, bypasses: float) -> float:
                return _math_value(p, {by_name["Hits"]: hits, by_name["Misses"]: misses, by_name["Bypasses"]: bypasses})
            try:
                if not (_breaches(p, rate(900, 40, 60)) and not _breaches(p, rate(900, 60, 40))):
                    problems.append(f"{name} must breach above 5% bypassed reads and not below")
                if _breaches(p, rate(5, 0, 5)):
                    problems.append(f"{name} breaches on a quiet minute (10 reads), where one cold start passes 5%")
                if not _breaches(p, rate(0, 0, 1000)):
                    problems.append(f"{name} must breach when every read bypasses (Redis down)")
            except (KeyError, ValueError, ZeroDivisionError, SyntaxError) as e:
                problems.append(f"{name}: cannot evaluate its expression ({e!r})")
        if (p.get("EvaluationPeriods"), p.get("DatapointsToAlarm"), p.get("TreatMissingData")) != (5, 3, "notBreaching"):
            problems.append(f"{name} must alarm on 3 of 5 minutes, missing data not breaching")
        if any(m.get("MetricStat", {}).get("Period") != 60 for m in as_list(p.get("Metrics")) if "MetricStat" in m):
            problems.append(f"{name} must evaluate per minute")

    # Every alarm on the functions' metrics watches something they emit, and every alarm goes to
    # the topic and fits CloudFormation's description limit.
    for name, a in resources(t, "AWS::CloudWatch::Alarm").items():
        p = a["Properties"]
        watched = [p] + list(_math_metrics(p).values())
        for m in watched:
            if not is_ref(m.get("Namespace"), METRICS_NS):
                continue
            dims = {d.get("Name"): d.get("Value") for d in as_list(m.get("Dimensions"))}
            if m.get("MetricName") not in EMITTED.get(dims.get("Function"), set()):
                problems.append(f"{name} watches {dims.get('Function')} {m.get('MetricName')}, which is not emitted")
        for key in ("AlarmActions", "OKActions"):
            if p.get(key) != {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}:
                problems.append(f"{name}.{key} must be the AlarmTopicArn (when set)")
        if not 40 <= len(str(p.get("AlarmDescription", ""))) <= 1024:
            problems.append(f"{name}.AlarmDescription must say why in at most 1024 characters")
    return problems


# ---- the dashboard ---------------------------------------------------------------------------------


def placeholder(name: str) -> str:
    return f"<{name}>"


def render(t: dict, node: Any, variables: dict[str, str] | None = None) -> Any:
    """Evaluates Ref, GetAtt, Sub, Join and FindInMap (Fn::If already resolved), with each
    resource and pseudo parameter standing for `<Name>` and each parameter for its default."""
    variables = variables or {}
    if isinstance(node, list):
        return [render(t, v, variables) for v in node]
    if not isinstance(node, dict):
        return node
    if "Ref" in node:
        name = node["Ref"]
        if name in variables:
            return variables[name]
        if name in t.get("Parameters", {}):
            return str(t["Parameters"][name].get("Default", ""))
        return placeholder(name)
    if "Fn::GetAtt" in node:
        res, attr = getatt(node)
        return placeholder(f"{res}.{attr}")
    if "Fn::Join" in node:
        sep, items = node["Fn::Join"]
        return sep.join(str(render(t, i, variables)) for i in items)
    if "Fn::FindInMap" in node:
        m, k1, k2 = (render(t, x, variables) for x in node["Fn::FindInMap"])
        return t["Mappings"][m][str(k1)][k2]
    if "Fn::Sub" in node:
        sub = node["Fn::Sub"]
        text, local = (sub, {}) if isinstance(sub, str) else (sub[0], sub[1])
        local = {k: str(render(t, v, variables)) for k, v in local.items()}

        def value(m: re.Match) -> str:
            name = m.group(1)
            if name in local:
                return local[name]
            if "." in name:
                return placeholder(name)
            return str(render(t, {"Ref": name}, variables))
        return re.sub(r"\$\{(?!!)([^}]+)\}", value, text)
    return {k: render(t, v, variables) for k, v in node.items()}


def dashboard_bodies(t: dict) -> Iterator[tuple[dict[str, str], Any]]:
    """(parameters, the dashboard body as CloudFormation would send it) for every cache topology
    and inspector interval, and a serverless cache with every interval; the body is a string,
    json-decoded by the caller."""
    dashboards = resources(t, "AWS::CloudWatch::Dashboard")
    minutes_values = t["Parameters"].get("InspectorIntervalMinutes", {}).get("AllowedValues", [5])
    variants = [
        {"CacheType": "nodes", "CacheShards": str(shards), "CacheReplicasPerShard": str(replicas)}
        for shards in t["Parameters"]["CacheShards"].get("AllowedValues", [])
        for replicas in t["Parameters"]["CacheReplicasPerShard"].get("AllowedValues", [])
    ] + [{"CacheType": "serverless", "CacheAuthMode": "iam"}]
    for name, r in dashboards.items():
        for variant in variants:
            for minutes in minutes_values:
                params = {**variant, "InspectorIntervalMinutes": str(minutes)}
                body = resolve_ifs(t, r["Properties"].get("DashboardBody"), params)
                yield params, render(t, body, {"InspectorIntervalMinutes": str(minutes)})


# A serverless cache's graphs: its metric -> the statistic shown (the alarms' own).
SERVERLESS_GRAPHS = {
    "ElastiCacheProcessingUnits": "Sum",
    "EvalBasedCmdsECPUs": "Sum",
    "ThrottledCmds": "Sum",
    "BytesUsedForCache": "Maximum",
    "Evictions": "Sum",
    "SuccessfulReadRequestLatency": "p99",
    "SuccessfulWriteRequestLatency": "p99",
}


def _metric_rows(widget: dict) -> list[tuple[list, dict]]:
    """(row without options, options) of a metric widget, with "." repeats filled in."""
    rows, previous = [], []
    for row in widget.get("properties", {}).get("metrics", []):
        options = row[-1] if row and isinstance(row[-1], dict) else {}
        values = row[:-1] if options else row
        if options.get("expression") is not None:
            rows.append(([], options))
            continue
        values = [previous[i] if v == "." and i < len(previous) else v for i, v in enumerate(values)]
        previous = values
        rows.append((values, options))
    return rows


def check_dashboard(t: dict) -> list[str]:
    """The dashboard's body is JSON once CloudFormation has substituted it, names only metrics
    the functions emit (in this stack's namespace and service) and resources of this stack, shows
    what the issue asks for, and graphs every cache node the topology has and no other; with a
    serverless cache, its metrics (dimension clusterId) and no node's."""
    dashboards = resources(t, "AWS::CloudWatch::Dashboard")
    if len(dashboards) != 1:
        return [f"need exactly one dashboard, found {sorted(dashboards)}"]
    (dash_name,) = dashboards
    problems = []
    out = t.get("Outputs", {}).get("DashboardUrl", {}).get("Value")
    if dash_name not in referenced_names(out):
        problems.append(f"output DashboardUrl must name {dash_name}")
    ns, stack = str(t["Parameters"][METRICS_NS].get("Default")), placeholder("AWS::StackName")
    names = set(t.get("Resources", {}))
    for params, text in dashboard_bodies(t):
        where = f"dashboard with {params}"
        try:
            body = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            problems.append(f"{where}: body is not JSON after substitution: {e}")
            continue
        own: dict[str, set[tuple[str, str]]] = {}  # function -> {(metric, stat)}
        aws: set[tuple[str, str]] = set()
        nodes: dict[str, set[str]] = {}  # cache metric -> node suffixes graphed
        per_cache: dict[str, set[tuple]] = {}  # serverless metric -> (dimensions, stat) graphed
        expressions: list[str] = []
        per_million: set[int] = set()  # periods of inconsistent-per-million-checked-changes math
        for w in body.get("widgets", []):
            if w.get("type") != "metric":
                continue
            props_ = w.get("properties", {})
            if props_.get("region") != placeholder("AWS::Region"):
                problems.append(f"{where}: widget {props_.get('title')!r} is not in the stack's Region")
            ids, widget_expressions = set(), []
            own_ids: dict[str, tuple[str, Any, Any]] = {}  # id -> (metric, stat, period) of own metrics
            for values, options in _metric_rows(w):
                if "id" in options:
                    ids.add(options["id"])
                if options.get("expression") is not None:
                    widget_expressions.append(options["expression"])
                    continue
                if len(values) < 2 or len(values) % 2:
                    problems.append(f"{where}: malformed metric row {values}")
                    continue
                namespace, metric, dims = values[0], values[1], dict(zip(values[2::2], values[3::2]))
                stat = options.get("stat", props_.get("stat"))
                if namespace == ns:
                    fn = dims.get("Function")
                    if fn == "inspector" and "id" in options:
                        own_ids[options["id"]] = (metric, stat, options.get("period", props_.get("period")))
                    if dims != {"Service": stack, "Function": fn} or metric not in EMITTED.get(fn, set()):
                        problems.append(f"{where}: {metric} {dims} is not a metric the functions emit for this stack")
                    own.setdefault(fn, set()).add((metric, stat))
                elif namespace.startswith("AWS/"):
                    aws.add((namespace, metric))
                    for v in dims.values():
                        base = str(v).strip("<>").split(".")[0]
                        if namespace == "AWS/ElastiCache" and dims == {"clusterId": placeholder(SERVERLESS)}:
                            per_cache.setdefault(metric, set()).add(stat)
                        elif namespace == "AWS/ElastiCache":
                            nodes.setdefault(metric, set()).add(str(v).replace(placeholder(CACHE), ""))
                        elif not (str(v).startswith("<") and base in names):
                            problems.append(f"{where}: {namespace} {metric} names {v!r}, not a resource of this stack")
                else:
                    problems.append(f"{where}: namespace {namespace!r} is neither MetricsNamespace nor AWS's")
            for e in widget_expressions:
                missing = set(re.findall(r"\b([a-z]\w*)\b", e)) - ids
                if missing:
                    problems.append(f"{where}: expression {e!r} uses ids {sorted(missing)} its widget lacks")
                # The change monitor's "nines": inconsistent changes per million checked, both
                # summed over the same period.
                m = re.fullmatch(r"\s*1000000\s*\*\s*(\w+)\s*/\s*(\w+)\s*", e)
                if m and m.group(1) in own_ids and m.group(2) in own_ids:
                    (inc, inc_stat, inc_period), (chk, chk_stat, chk_period) = own_ids[m.group(1)], own_ids[m.group(2)]
                    if ((inc, chk) == ("ChangesInconsistent", "ChangesChecked") and inc_stat == chk_stat == "Sum"
                            and inc_period == chk_period and isinstance(inc_period, int)):
                        per_million.add(inc_period)
            expressions += widget_expressions
        wanted = {
            "read": {("Hits", "Sum"), ("Misses", "Sum"), ("Bypasses", "Sum"), ("BreakerBypasses", "Sum"),
                     ("LeaseWaits", "Sum"), ("RefusedFills", "Sum"), ("BatchReads", "Sum"),
                     ("BatchSize", "p50"), ("BatchSize", "p99")},
            "invalidator": {("InvalidationLag", "p50"), ("InvalidationLag", "p99"), ("InvalidationLag", "Maximum"),
                            ("BatchSize", "Average"), ("RecordsApplied", "Sum"), ("RecordsRefusedAsOlder", "Sum"),
                            ("RecordsSkippedMalformed", "Sum"), ("RecordsFailed", "Sum")},
            "inspector": {("KeysChecked", "Sum"), ("InconsistentKeys", "Sum"),
                          ("ChangesChecked", "Sum"), ("ChangesPending", "Sum"), ("ChangesInconsistent", "Sum"),
                          ("PendingChangeAge", "p99"), ("PendingChangeAge", "Maximum")},
        }
        for fn, want in wanted.items():
            missing = want - own.get(fn, set())
            if missing:
                problems.append(f"{where}: no graph of {fn} {sorted(missing)}")
        for pattern in (r"hits\s*/\s*\(hits \+ misses \+ bypasses\)", r"bypasses\s*/\s*\(hits \+ misses \+ bypasses\)"):
            if not any(re.search(pattern, e) for e in expressions):
                problems.append(f"{where}: no expression {pattern}")
        for period, span in ((86400, "a day"), (604800, "a week")):
            if period not in per_million:
                problems.append(f"{where}: no 1000000 * ChangesInconsistent / ChangesChecked (Sum) over {span} ({period} s)")
        # The AWS metrics the stack alarms on (with these parameters) are on the dashboard too.
        for name, a in resources(deployed(t, params), "AWS::CloudWatch::Alarm").items():
            p = a["Properties"]
            for m in [p] + list(_math_metrics(p).values()):
                ns_ = m.get("Namespace")
                if isinstance(ns_, str) and ns_.startswith("AWS/") and (ns_, m.get("MetricName")) not in aws:
                    problems.append(f"{where}: {name}'s {ns_} {m.get('MetricName')} is not graphed")
        if params["CacheType"] == "serverless":
            if nodes:
                problems.append(f"{where}: graphs cache nodes {sorted(nodes)}; a serverless cache has none")
            for metric, stat in SERVERLESS_GRAPHS.items():
                if stat not in per_cache.get(metric, set()):
                    problems.append(f"{where}: no graph of the serverless cache's {metric} ({stat}, clusterId)")
            continue
        if per_cache:
            problems.append(f"{where}: graphs serverless metrics {sorted(per_cache)} of a replication group")
        shards, replicas = int(params["CacheShards"]), int(params["CacheReplicasPerShard"])
        want_nodes = {f"-{s_:04d}-{n:03d}" for s_ in range(1, shards + 1) for n in range(1, replicas + 2)}
        for metric in ("EngineCPUUtilization", "DatabaseMemoryUsagePercentage", "Evictions"):
            if nodes.get(metric) != want_nodes:
                problems.append(f"{where}: {metric} graph shows {sorted(nodes.get(metric, []))}, the cache has {sorted(want_nodes)}")
    return problems


# ---- the runbooks ---------------------------------------------------------------------------------

RUNBOOKS_PATH = REPO / "docs" / "runbooks.md"
# How an alarm's description names its runbook: the last words of every AlarmDescription.
RUNBOOK_LINK = re.compile(r"Runbook: docs/runbooks\.md#([A-Za-z0-9_-]+)$")
# The parts every alarm's section has, as bold labels, in the reading order of an incident.
RUNBOOK_PARTS = ("**What fired.**", "**For users.**", "**Confirm.**", "**Do.**", "**Do not.**", "**Clears.**")
# A dashboard graph named in a runbook: its title in bold quotes.
RUNBOOK_GRAPH = re.compile(r'\*\*"([^"]+)"\*\*')


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation other than - and _
    dropped, spaces made -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_sections(text: str) -> list[tuple[int, str, str, str]]:
    """(level, heading, anchor, body) of every heading of the page, in order, outside code
    blocks; the body runs to the next heading of any level."""
    sections: list[tuple[int, str, str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^(#{1,6})\s+(.+?)\s*#*\s*$", line)
        if m:
            heading = m.group(2).replace("`", "")
            sections.append((len(m.group(1)), heading, github_anchor(heading), []))
        elif sections:
            sections[-1][3].append(line)
    return [(n, h, a, "\n".join(body)) for n, h, a, body in sections]


def _alarm_sections(text: str) -> dict[str, tuple[str, str]]:
    """Alarm name -> (anchor, body) for every section below the page's title whose heading is
    one identifier: an alarm's logical id (every other heading has more than one word)."""
    return {
        h: (a, body)
        for n, h, a, body in runbook_sections(text)
        if n > 1 and re.fullmatch(r"[A-Za-z0-9]+", h)
    }


def dashboard_titles(t: dict) -> set[str]:
    """Every widget title the dashboard has, for any cache type, topology or interval."""
    titles = set()
    for _, body in dashboard_bodies(t):
        try:
            widgets = json.loads(body).get("widgets", [])
        except (TypeError, ValueError):
            continue
        titles |= {w.get("properties", {}).get("title") for w in widgets if isinstance(w, dict)}
    return titles - {None}


def _runbook_variants(t: dict) -> list[dict[str, str]]:
    """Every combination of the values of the parameters the alarms' conditions depend on, so
    that an alarm of any cache type, or any other condition, is looked at as deployed."""
    def parameters(node: Any) -> set[str]:
        if isinstance(node, str):
            return parameters(t.get("Conditions", {}).get(node)) if node in t.get("Conditions", {}) else set()
        if isinstance(node, dict):
            if "Ref" in node and node["Ref"] in t.get("Parameters", {}):
                return {node["Ref"]}
            if "Condition" in node:
                return parameters(node["Condition"])
            return set().union(*(parameters(v) for v in node.values())) if node else set()
        if isinstance(node, list):
            return set().union(*(parameters(v) for v in node)) if node else set()
        return set()

    names = set()
    for a in resources(t, "AWS::CloudWatch::Alarm").values():
        names |= parameters(a.get("Condition")) | parameters(a.get("Properties", {}).get("AlarmDescription"))
    variants: list[dict[str, str]] = [{}]
    for name in sorted(names):
        values = t["Parameters"][name].get("AllowedValues") or [t["Parameters"][name].get("Default", "")]
        variants = [{**v, name: str(value)} for v in variants for value in values]
    return variants


def check_runbooks(t: dict, runbooks: str | None = None) -> list[str]:
    """Every alarm of the template, under every condition (each cache type, the change monitor
    on or off), ends its description by naming its own section of docs/runbooks.md, which
    exists; every alarm section there (a heading that is an alarm's logical id) names an alarm
    the template still has, once, with each of the six parts; and every dashboard graph a
    runbook names is one the dashboard has. `runbooks` is the page's text (default: the file)."""
    text = RUNBOOKS_PATH.read_text() if runbooks is None else runbooks
    problems = []
    alarms = resources(t, "AWS::CloudWatch::Alarm")
    sections = _alarm_sections(text)
    headings = [h for _, h, _, _ in runbook_sections(text)]
    for heading in sorted({h for h in headings if headings.count(h) > 1}):
        problems.append(f"docs/runbooks.md has the heading {heading!r} more than once")
    for name in alarms:
        if name not in sections:
            problems.append(f"{name} has no section in docs/runbooks.md (a heading `### {name}`)")
    for name in sections:
        if name not in alarms:
            problems.append(f"docs/runbooks.md has a section for {name}, which the template no longer has")
    # Each alarm's description as CloudFormation sends it, in every deployment that creates it.
    variants = _runbook_variants(t)
    for name, alarm in alarms.items():
        descriptions = []
        for params in variants:
            condition = alarm.get("Condition")
            if isinstance(condition, str) and not evaluate_condition(t, condition, params):
                continue
            description = render(t, resolve_ifs(t, alarm.get("Properties", {}).get("AlarmDescription"), params))
            descriptions.append((params, description))
        if not descriptions:
            # Created only under parameters no variant above sets (a condition on a free-form
            # parameter): its description as written, with the parameters' defaults.
            description = render(t, resolve_ifs(t, alarm.get("Properties", {}).get("AlarmDescription"), {}))
            descriptions.append(({}, description))
        want = sections.get(name, (github_anchor(name), ""))[0]
        for params, description in descriptions:
            where = f"{name} ({', '.join(f'{k}={v}' for k, v in params.items()) or 'always'})"
            m = RUNBOOK_LINK.search(description) if isinstance(description, str) else None
            if not m:
                problems.append(f"{where}: AlarmDescription must end with 'Runbook: docs/runbooks.md#{want}'")
            elif m.group(1) != want:
                problems.append(f"{where}: AlarmDescription names runbook section #{m.group(1)}, its own is #{want}")
    titles = dashboard_titles(t)
    for name, (_, body) in sections.items():
        for part in RUNBOOK_PARTS:
            if part not in body:
                problems.append(f"docs/runbooks.md#{name.lower()} has no {part} part")
        graphs = {" ".join(g.split()) for g in RUNBOOK_GRAPH.findall(body)}
        if not graphs:
            problems.append(f"docs/runbooks.md#{name.lower()} names no dashboard graph (**\"its title\"**)")
        for graph in sorted(graphs - titles):
            problems.append(f"docs/runbooks.md#{name.lower()} names the graph {graph!r}, which the dashboard does not have")
    return problems


ALL_CHECKS = [
    check_stream_event_source,
    check_record_age_covers_ttl,
    check_read_function_policies,
    check_read_routes,
    check_invalidator_policies,
    check_replication_group,
    check_auth_modes,
    check_auth_secret,
    check_security_groups,
    check_table,
    check_failure_queue_encrypted,
    check_function_build,
    check_vpc_endpoints,
    check_conditional_references,
    check_environment,
    check_alarms,
    check_cache_alarm_topology,
    check_function_sizing,
    check_outputs,
    check_serverless_requires_iam,
    check_serverless_cache,
    check_serverless_alarms,
    check_checkov_skips,
    check_inspector,
    check_inspector_policies,
    check_change_monitor,
    check_metrics_environment,
    check_metric_alarms,
    check_dashboard,
    check_runbooks,
]
