"""Tests of what infra/template.yaml promises (see template_checks.py for each check).

Every check must pass on the template, and each "weakened" case below changes a copy of it in
memory the way a careless edit would and asserts that the check responsible reports it: a check
that cannot fail would protect nothing.
"""

import copy
import json
import os
import re

import pytest

import template_checks as c
from template_checks import (
    CACHE,
    IAM_USER,
    INVALIDATOR,
    READ,
    SECRET,
    TABLE,
    USER_GROUP,
    props,
)


@pytest.mark.parametrize("check", c.ALL_CHECKS, ids=lambda f: f.__name__)
def test_template_passes(check, template):
    assert check(template) == []


# ---- weakened copies --------------------------------------------------------------------------


def stream_event(t):
    return props(t, INVALIDATOR)["Events"]["TableStream"]["Properties"]


def role_policy(t, role):
    return props(t, role)["Policies"][0]["PolicyDocument"]["Statement"]


def drop_report_batch_item_failures(t):
    stream_event(t)["FunctionResponseTypes"] = []


def drop_bisect(t):
    del stream_event(t)["BisectBatchOnFunctionError"]


def unbounded_retries(t):
    del stream_event(t)["MaximumRetryAttempts"]  # Lambda's default: -1, retry forever


def retries_parameter_allows_forever(t):
    t["Parameters"]["StreamMaximumRetryAttempts"]["MinValue"] = -1


def infinite_record_age(t):
    stream_event(t)["MaximumRecordAgeInSeconds"] = -1


def drop_on_failure(t):
    del stream_event(t)["DestinationConfig"]


def record_age_below_ttl(t):
    t["Parameters"]["StreamMaximumRecordAgeInSeconds"]["Default"] = 600


def read_can_put_item(t):
    role_policy(t, "ReadFunctionRole")[0]["Action"] = ["dynamodb:GetItem", "dynamodb:PutItem"]


def read_can_query(t):
    role_policy(t, "ReadFunctionRole").append(
        {"Effect": "Allow", "Action": "dynamodb:Query", "Resource": {"Fn::GetAtt": [TABLE, "Arn"]}}
    )


def read_on_every_table(t):
    role_policy(t, "ReadFunctionRole")[0]["Resource"] = "*"


def read_with_wildcard_action(t):
    role_policy(t, "ReadFunctionRole")[0]["Action"] = "dynamodb:Get*"


def read_through_a_separate_policy(t):
    t["Resources"]["ExtraReadPolicy"] = {
        "Type": "AWS::IAM::Policy",
        "Properties": {
            "PolicyName": "extra",
            "Roles": [{"Ref": "ReadFunctionRole"}],
            "PolicyDocument": {"Statement": [
                {"Effect": "Allow", "Action": "dynamodb:Scan", "Resource": {"Fn::GetAtt": [TABLE, "Arn"]}}
            ]},
        },
    }


def read_with_sam_policy_template(t):
    props(t, READ)["Policies"] = [{"DynamoDBCrudPolicy": {"TableName": {"Ref": TABLE}}}]


def read_with_broad_managed_policy(t):
    props(t, "ReadFunctionRole")["ManagedPolicyArns"].append(
        "arn:aws:iam::aws:policy/AmazonDynamoDBReadOnlyAccess"
    )


def read_without_batch_get_item(t):
    role_policy(t, "ReadFunctionRole")[0]["Action"] = "dynamodb:GetItem"


def read_batch_gets_every_table(t):
    role_policy(t, "ReadFunctionRole").append(
        {"Effect": "Allow", "Action": "dynamodb:BatchGetItem", "Resource": "*"}
    )


def read_batch_gets_another_table(t):
    role_policy(t, "ReadFunctionRole")[0]["Resource"] = {
        "Fn::Sub": "arn:${AWS::Partition}:dynamodb:${AWS::Region}:${AWS::AccountId}:table/*"
    }


def inspector_without_batch_get_item(t):
    role_policy(t, "InspectorFunctionRole")[0]["Action"] = "dynamodb:GetItem"


def inspector_batch_gets_every_table(t):
    role_policy(t, "InspectorFunctionRole")[0]["Resource"] = "*"


# ---- the read function's routes ---------------------------------------------------------------


def read_events(t):
    return props(t, READ)["Events"]


def no_batch_route(t):
    del read_events(t)["GetProducts"]


def batch_route_on_any_method(t):
    read_events(t)["GetProducts"]["Properties"]["Method"] = "ANY"


def batch_route_on_the_implicit_api(t):
    del read_events(t)["GetProducts"]["Properties"]["ApiId"]


def catch_all_route(t):
    read_events(t)["Everything"] = {
        "Type": "HttpApi", "Properties": {"ApiId": {"Ref": "ProductApi"}},
    }


def invalidator_can_delete_items(t):
    role_policy(t, "InvalidatorFunctionRole").append(
        {"Effect": "Allow", "Action": "dynamodb:DeleteItem", "Resource": {"Fn::GetAtt": [TABLE, "Arn"]}}
    )


def invalidator_reads_every_stream(t):
    role_policy(t, "InvalidatorFunctionRole")[0]["Resource"] = "*"


def cache_without_tls(t):
    props(t, CACHE)["TransitEncryptionEnabled"] = False


def cache_tls_preferred_only(t):
    props(t, CACHE)["TransitEncryptionMode"] = "preferred"


def cache_without_at_rest_encryption(t):
    del props(t, CACHE)["AtRestEncryptionEnabled"]


def cache_without_failover(t):
    props(t, CACHE)["AutomaticFailoverEnabled"] = False


def cache_single_az(t):
    props(t, CACHE)["MultiAZEnabled"] = False


def cache_may_have_no_replica(t):
    t["Parameters"]["CacheReplicasPerShard"]["AllowedValues"] = [0, 1, 2]


def cache_token_in_template(t):
    props(t, CACHE)["AuthToken"] = "a-literal-token-in-the-template"


def cache_token_from_parameter(t):
    t["Parameters"]["CacheAuthToken"] = {"Type": "String", "NoEcho": True}
    props(t, CACHE)["AuthToken"] = {"Ref": "CacheAuthToken"}


def token_may_contain_at_sign(t):
    g = props(t, SECRET)["GenerateSecretString"]
    g["ExcludeCharacters"] = g["ExcludeCharacters"].replace("@", "")


def token_too_long(t):
    props(t, SECRET)["GenerateSecretString"]["PasswordLength"] = 200


def egress_to_the_internet(t):
    props(t, "FunctionSecurityGroup")["SecurityGroupEgress"].append(
        {"IpProtocol": "-1", "CidrIp": "0.0.0.0/0"}
    )


def ipv6_ingress_to_the_cache(t):
    t["Resources"]["OpenCache"] = {
        "Type": "AWS::EC2::SecurityGroupIngress",
        "Properties": {"GroupId": {"Ref": "CacheSecurityGroup"}, "IpProtocol": "tcp",
                       "FromPort": 6379, "ToPort": 6379, "CidrIpv6": "::/0"},
    }


def cache_group_keeps_default_egress(t):
    del props(t, "CacheSecurityGroup")["SecurityGroupEgress"]


def functions_accept_connections(t):
    props(t, "FunctionSecurityGroup")["SecurityGroupIngress"] = [
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "CidrIp": "10.0.0.0/8"}
    ]


def table_without_pitr(t):
    props(t, TABLE)["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] = False


def table_without_sse(t):
    del props(t, TABLE)["SSESpecification"]


def table_keys_only_stream(t):
    props(t, TABLE)["StreamSpecification"]["StreamViewType"] = "KEYS_ONLY"


def table_deleted_with_stack(t):
    del t["Resources"][TABLE]["DeletionPolicy"]


def queue_unencrypted(t):
    del props(t, "StreamFailureQueue")["SqsManagedSseEnabled"]


def read_function_on_x86(t):
    props(t, READ)["Architectures"] = ["x86_64"]


def invalidator_on_old_runtime(t):
    props(t, INVALIDATOR)["Runtime"] = "provided.al2"


def build_without_cargo_lambda(t):
    del t["Resources"][INVALIDATOR]["Metadata"]["BuildMethod"]


def build_a_binary_that_does_not_exist(t):
    t["Resources"][READ]["Metadata"]["BuildProperties"]["Binary"] = "reader"


def no_gateway_endpoint(t):
    del t["Resources"]["DynamoDbGatewayEndpoint"]


def gateway_policy(t):
    return props(t, "DynamoDbGatewayEndpoint")["PolicyDocument"]["Fn::If"][1]["Statement"]


def gateway_without_batch_get_item(t):
    gateway_policy(t)[0]["Action"] = "dynamodb:GetItem"


def gateway_allows_scan(t):
    gateway_policy(t)[0]["Action"] = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Scan"]


def gateway_on_every_table(t):
    gateway_policy(t)[0]["Resource"] = "*"


def gateway_policy_everywhere(t):
    props(t, "DynamoDbGatewayEndpoint")["PolicyDocument"] = props(t, "DynamoDbGatewayEndpoint")[
        "PolicyDocument"
    ]["Fn::If"][2]


def secrets_endpoint_without_private_dns(t):
    props(t, "SecretsManagerEndpoint")["PrivateDnsEnabled"] = False


def table_name_ignores_existing_table(t):
    props(t, READ)["Environment"]["Variables"]["TABLE_NAME"] = {"Ref": TABLE}


def subnet_group_ignores_existing_vpc(t):
    props(t, "CacheSubnetGroup")["SubnetIds"] = [{"Ref": "PrivateSubnetA"}, {"Ref": "PrivateSubnetB"}]


def plain_redis_url(t):
    props(t, INVALIDATOR)["Environment"]["Variables"]["REDIS_URL"] = {
        "Fn::Sub": "redis://${CacheReplicationGroup.ConfigurationEndPoint.Address}:6379"
    }


def eventually_consistent_reads(t):
    props(t, READ)["Environment"]["Variables"]["CONSISTENT_READ"] = "false"


def no_iterator_age_alarm(t):
    del t["Resources"]["InvalidatorIteratorAgeAlarm"]


def cache_alarm_misses_third_shard(t):
    alarm = props(t, "CacheMemoryAlarm")
    alarm["Metrics"] = [m for m in alarm["Metrics"] if "s3n" not in str(m)]


def no_evictions_alarm(t):
    del t["Resources"]["CacheEvictionsAlarm"]


def evictions_alarm_misses_third_shard(t):
    alarm = props(t, "CacheEvictionsAlarm")
    alarm["Metrics"] = [m for m in alarm["Metrics"] if "s3n" not in str(m)]


def cache_alarm_watches_a_shard_too_early(t):
    metrics = props(t, "CacheEngineCpuAlarm")["Metrics"]
    guarded = next(m for m in metrics if isinstance(m, dict) and "Fn::If" in m and m["Fn::If"][0] == "HasShard3")
    guarded["Fn::If"][0] = "HasShard2"


def no_reserved_concurrency(t):
    del props(t, INVALIDATOR)["ReservedConcurrentExecutions"]


def read_timeout_beyond_api_gateway(t):
    props(t, READ)["Timeout"] = 60


def no_api_url_output(t):
    del t["Outputs"]["ApiUrl"]


# ---- IAM authentication (CacheAuthMode iam) ------------------------------------------------------


def connect_statement(t, role):
    """The elasticache:Connect statement (the yes-branch of its !If [IamAuth, ...])."""
    for s in role_policy(t, role):
        branch = s.get("Fn::If", [None, {}])[1] if "Fn::If" in s else s
        if "elasticache:Connect" in str(branch.get("Action")):
            return branch
    raise AssertionError(f"{role} has no elasticache:Connect statement")


def iam_mode_without_connect(t):
    statements = role_policy(t, "InvalidatorFunctionRole")
    statements[:] = [s for s in statements if "elasticache:Connect" not in str(s)]


def iam_connect_on_every_resource(t):
    connect_statement(t, "ReadFunctionRole")["Resource"] = "*"


def iam_connect_on_every_user(t):
    connect_statement(t, "InvalidatorFunctionRole")["Resource"][1] = {
        "Fn::Sub": "arn:${AWS::Partition}:elasticache:${AWS::Region}:${AWS::AccountId}:user:*"
    }


def iam_connect_without_the_user(t):
    del connect_statement(t, "ReadFunctionRole")["Resource"][1]


def iam_connect_with_more_actions(t):
    connect_statement(t, "ReadFunctionRole")["Action"] = ["elasticache:Connect", "elasticache:DescribeUsers"]


def token_mode_grants_connect(t):
    statements = role_policy(t, "ReadFunctionRole")
    statements[:] = [connect_statement(t, "ReadFunctionRole") if "elasticache:Connect" in str(s) else s
                     for s in statements]


def iam_user_with_password(t):
    props(t, IAM_USER)["AuthenticationMode"] = {"Type": "password", "Passwords": ["x" * 16]}


def iam_user_with_every_command(t):
    props(t, IAM_USER)["AccessString"] = "on ~* +@all"


def iam_user_name_differs_from_id(t):
    props(t, IAM_USER)["UserName"] = "functions"


def group_with_the_builtin_default_user(t):
    props(t, USER_GROUP)["UserIds"][0] = "default"


def default_user_enabled(t):
    props(t, "CacheDisabledDefaultUser")["AccessString"] = "on ~* +@all"


def group_without_a_default_user(t):
    props(t, USER_GROUP)["UserIds"] = [{"Ref": IAM_USER}]


def iam_mode_keeps_the_auth_token(t):
    props(t, CACHE)["AuthToken"] = props(t, CACHE)["AuthToken"]["Fn::If"][1]


def iam_mode_without_the_user_group(t):
    del props(t, CACHE)["UserGroupIds"]


def iam_mode_keeps_the_secret(t):
    del t["Resources"][SECRET]["Condition"]


def iam_mode_keeps_the_secret_arn(t):
    props(t, READ)["Environment"]["Variables"]["REDIS_AUTH_SECRET_ARN"] = {"Ref": SECRET}


def iam_mode_without_the_user_variable(t):
    del props(t, INVALIDATOR)["Environment"]["Variables"]["REDIS_IAM_USER"]


def iam_mode_signs_for_another_group(t):
    props(t, READ)["Environment"]["Variables"]["REDIS_IAM_CACHE_NAME"] = "product-cache"


def iam_mode_names_the_cache_twice(t):
    # The earlier name beside the new one: the functions refuse to start with both.
    props(t, READ)["Environment"]["Variables"]["REDIS_IAM_REPLICATION_GROUP"] = {
        "Fn::If": ["IamAuth", {"Ref": CACHE}, {"Ref": "AWS::NoValue"}]
    }


def iam_is_the_default(t):
    t["Parameters"]["CacheAuthMode"]["Default"] = "iam"


def secret_referenced_outside_token_mode(t):
    t["Outputs"]["CacheAuthSecretArn"].pop("Condition")


def open_egress_under_a_condition(t):
    props(t, "FunctionSecurityGroup")["SecurityGroupEgress"].append(
        {"Fn::If": ["IamAuth", {"IpProtocol": "-1", "CidrIp": "0.0.0.0/0"}, {"Ref": "AWS::NoValue"}]}
    )


def secrets_egress_in_iam_mode(t):
    del t["Resources"]["FunctionToSecretsManagerEgress"]["Condition"]


def skip_without_reason(t):
    t["Resources"][TABLE]["Metadata"]["checkov"]["skip"][0]["comment"] = "n/a"


def unconfirmed_invalidations(t):
    del t["Resources"][c.INVALIDATOR]["Properties"]["Environment"]["Variables"]["REDIS_CONFIRM_REPLICAS"]


# ---- the inspector, metrics, alarms on them, the dashboard ------------------------------------------


INSPECTOR_USER = c.INSPECTOR_USER


def inspector_env(t):
    return props(t, c.INSPECTOR)["Environment"]["Variables"]


def dashboard_text(t):
    return props(t, "Dashboard")["DashboardBody"]["Fn::Sub"]


def set_dashboard_text(t, text):
    props(t, "Dashboard")["DashboardBody"]["Fn::Sub"][0] = text


def inspector_key_type_drifts(t):
    inspector_env(t)["KEY_TYPE"] = "S"


def inspector_without_version_attribute(t):
    del inspector_env(t)["VERSION_ATTRIBUTE"]


def inspector_signs_as_the_functions_user(t):
    inspector_env(t)["REDIS_IAM_USER"] = {"Fn::If": ["IamAuth", {"Ref": IAM_USER}, {"Ref": "AWS::NoValue"}]}


def inspector_schedule_not_the_interval(t):
    props(t, c.INSPECTOR)["Events"]["Schedule"]["Properties"]["Schedule"] = "rate(5 minutes)"


def interval_mapping_disagrees(t):
    t["Mappings"]["InspectorIntervals"]["5"]["Seconds"] = 60


def inspector_repairs_by_default(t):
    t["Parameters"]["InspectorRepair"]["Default"] = "true"


def inspector_timeout_within_grace(t):
    props(t, c.INSPECTOR)["Timeout"] = 30


def inspector_timeout_covers_one_grace(t):
    # 30 s grace + 1 s + 20 s: no room for the second look a grace period later.
    props(t, c.INSPECTOR)["Timeout"] = 60


def inspector_reserves_one_by_default(t):
    t["Parameters"][c.INSPECTOR_RESERVATION]["Default"] = 1


def inspector_reservation_one_or_none(t):
    param = t["Parameters"][c.INSPECTOR_RESERVATION]
    param.pop("MinValue"), param.pop("MaxValue")
    param["AllowedValues"] = [-1, 1]


def inspector_reservation_unbounded(t):
    del t["Parameters"][c.INSPECTOR_RESERVATION]["MaxValue"]


def inspector_reservation_fixed(t):
    props(t, c.INSPECTOR)["ReservedConcurrentExecutions"] = 1


def inspector_reservation_condition_on_one_only(t):
    t["Conditions"][c.INSPECTOR_RESERVATION_CONDITION] = {"Fn::Equals": [{"Ref": c.INSPECTOR_RESERVATION}, "1"]}


def inspector_without_invalidator_factor(t):
    del inspector_env(t)[c.FACTOR_VARIABLE]


def inspector_assumes_factor_one(t):
    inspector_env(t)[c.FACTOR_VARIABLE] = "1"


def invalidator_factor_apart_from_the_inspectors(t):
    stream_event(t)["ParallelizationFactor"] = 2


def inspector_can_put_item(t):
    role_policy(t, "InspectorFunctionRole")[0]["Action"] = ["dynamodb:GetItem", "dynamodb:PutItem"]


def inspector_connects_as_the_functions_user(t):
    connect_statement(t, "InspectorFunctionRole")["Resource"][1] = {"Fn::GetAtt": [IAM_USER, "Arn"]}


def inspector_user_may_flushall(t):
    props(t, INSPECTOR_USER)["AccessString"] += " +flushall"


def inspector_user_on_every_key(t):
    props(t, INSPECTOR_USER)["AccessString"] = props(t, INSPECTOR_USER)["AccessString"].replace("~product:*", "~*")


def functions_user_gets_randomkey(t):
    props(t, IAM_USER)["AccessString"] += " +randomkey"


def inspector_user_not_in_group(t):
    props(t, USER_GROUP)["UserIds"] = [u for u in props(t, USER_GROUP)["UserIds"] if u != {"Ref": INSPECTOR_USER}]


def service_is_not_the_stack(t):
    props(t, READ)["Environment"]["Variables"]["METRICS_SERVICE"] = "product-cache"


def inspector_without_namespace(t):
    del inspector_env(t)["METRICS_NAMESPACE"]


def namespace_may_be_off(t):
    t["Parameters"]["MetricsNamespace"]["AllowedPattern"] = ".*"


def inconsistency_threshold_raised(t):
    props(t, "InconsistentKeysAlarm")["Threshold"] = 5


def inconsistency_period_not_the_interval(t):
    props(t, "InconsistentKeysAlarm")["Period"] = 300


def heartbeat_ignores_missing_data(t):
    props(t, "InspectorHeartbeatAlarm")["TreatMissingData"] = "notBreaching"


def heartbeat_fires_on_a_present_zero(t):
    props(t, "InspectorHeartbeatAlarm")["Statistic"] = "Sum"


def no_heartbeat(t):
    del t["Resources"]["InspectorHeartbeatAlarm"]


def no_inspector_errors_alarm(t):
    del t["Resources"]["InspectorErrorsAlarm"]


def bypass_rate_inverted(t):
    props(t, "BypassRateAlarm")["Metrics"][0]["Expression"] = "IF(reads >= 60, 100 * (hits + misses) / reads, 0)"


def bypass_rate_without_volume_guard(t):
    props(t, "BypassRateAlarm")["Metrics"][0]["Expression"] = "100 * bypasses / reads"


def bypass_rate_breaches_on_missing_data(t):
    props(t, "BypassRateAlarm")["TreatMissingData"] = "breaching"


def lag_alarm_on_the_average(t):
    p = props(t, "InvalidationLagAlarm")
    del p["ExtendedStatistic"]
    p["Statistic"] = "Average"


def lag_threshold_within_the_rounding(t):
    t["Parameters"]["InvalidationLagAlarmMs"]["MinValue"] = 500


def lag_threshold_beyond_the_grace_period(t):
    t["Parameters"]["InvalidationLagAlarmMs"]["Default"] = 10000


def alarm_on_a_metric_nobody_emits(t):
    props(t, "MalformedRecordsAlarm")["MetricName"] = "RecordsMalformed"


def alarm_without_the_topic(t):
    del props(t, "BypassRateAlarm")["AlarmActions"]


def dashboard_not_json(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('"widgets": [', '"widgets": [,', 1))


def dashboard_metric_typo(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('"LeaseWaits"', '"LeaseWait"', 1))


def dashboard_other_service(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('"Service", "${AWS::StackName}"', '"Service", "product-cache"', 1))


def dashboard_without_lag_p99(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('"stat": "p99", "label": "p99"}],\n', '"stat": "p90", "label": "p90"}],\n'))


def dashboard_without_iterator_age(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('"IteratorAge"', '"Duration"'))


def cache_widgets(t, cache_type):
    """The dashboard's cache graphs for one cache type: the !Sub [text, variables] of its branch
    of CacheWidgets."""
    cond, nodes, serverless = dashboard_text(t)[1]["CacheWidgets"]["Fn::If"]
    assert cond == "NodeBasedCache"
    return (nodes if cache_type == "nodes" else serverless)["Fn::Sub"]


def node_graph_rows(t, variable):
    return cache_widgets(t, "nodes")[1][variable]["Fn::Join"][1]


def dashboard_misses_third_shard(t):
    rows = node_graph_rows(t, "CacheMemoryNodes")
    rows[:] = [r for r in rows if "0003-" not in str(r)]


def dashboard_evictions_miss_third_shard(t):
    rows = node_graph_rows(t, "CacheEvictionsNodes")
    rows[:] = [r for r in rows if "0003-" not in str(r)]


def dashboard_without_batch_size_p99(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('{"stat": "p99", "label": "products per batch p99"', '{"stat": "Maximum", "label": "products per batch max"', 1))


def dashboard_batch_reads_of_the_invalidator(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('"BatchReads", "Service", "${AWS::StackName}", "Function", "read"', '"BatchReads", "Service", "${AWS::StackName}", "Function", "invalidator"', 1))


def dashboard_expression_without_its_metric(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('{"id": "misses", "visible": false}', '{"id": "miss", "visible": false}', 1))


# ---- the change monitor -----------------------------------------------------------------------


def monitor_mapping(t):
    return props(t, "ChangeMonitorMapping")


def inspector_stream_statement(t, sid):
    """The inspector's stream statement with this Sid (the yes-branch of its !If [MonitorChanges, ...])."""
    for s in role_policy(t, "InspectorFunctionRole"):
        branch = s["Fn::If"][1] if "Fn::If" in s else s
        if branch.get("Sid") == sid:
            return branch
    raise AssertionError(f"InspectorFunctionRole has no statement {sid}")


def no_monitor_mapping(t):
    del t["Resources"]["ChangeMonitorMapping"]


def monitor_mapping_always_created(t):
    del t["Resources"]["ChangeMonitorMapping"]["Condition"]


def monitor_off_by_default(t):
    t["Parameters"][c.MONITOR_PARAM]["Default"] = "disabled"


def monitor_replays_the_stream(t):
    monitor_mapping(t)["StartingPosition"] = "TRIM_HORIZON"


def monitor_small_batches(t):
    monitor_mapping(t)["BatchSize"] = 100


def monitor_without_batching_window(t):
    del monitor_mapping(t)["MaximumBatchingWindowInSeconds"]


def monitor_parallel_batches_per_shard(t):
    monitor_mapping(t)["ParallelizationFactor"] = 2


def monitor_retries_forever(t):
    del monitor_mapping(t)["MaximumRetryAttempts"]


def monitor_keeps_records_a_day(t):
    monitor_mapping(t)["MaximumRecordAgeInSeconds"] = 86400


def monitor_bisects(t):
    monitor_mapping(t)["BisectBatchOnFunctionError"] = True


def monitor_reports_item_failures(t):
    monitor_mapping(t)["FunctionResponseTypes"] = ["ReportBatchItemFailures"]


def monitor_reads_another_stream(t):
    monitor_mapping(t)["EventSourceArn"] = {"Fn::GetAtt": [TABLE, "StreamArn"]}


def third_stream_reader(t):
    t["Resources"]["AnotherReader"] = {
        "Type": "AWS::Lambda::EventSourceMapping",
        "Properties": {"FunctionName": {"Ref": READ}, "StartingPosition": "LATEST",
                       "EventSourceArn": copy.deepcopy(monitor_mapping(t)["EventSourceArn"])},
    }


def inspector_reads_every_stream(t):
    inspector_stream_statement(t, "ReadTheTableStream")["Resource"] = "*"


def inspector_lists_every_stream(t):
    inspector_stream_statement(t, "ListTheTableStreams")["Resource"] = {
        "Fn::Sub": "arn:${AWS::Partition}:dynamodb:${AWS::Region}:${AWS::AccountId}:table/*/stream/*"
    }


def inspector_stream_grant_without_get_records(t):
    inspector_stream_statement(t, "ReadTheTableStream")["Action"] = [
        "dynamodb:DescribeStream", "dynamodb:GetShardIterator"
    ]


def inspector_stream_grant_without_the_monitor(t):
    statements = role_policy(t, "InspectorFunctionRole")
    statements[:] = [s["Fn::If"][1] if "Fn::If" in s and s["Fn::If"][0] == "MonitorChanges" else s
                     for s in statements]


def share_may_be_zero(t):
    t["Parameters"][c.MONITOR_SHARE_PARAM]["AllowedPattern"] = r"^[0-9.]+$"


def share_not_passed(t):
    del inspector_env(t)["MONITOR_SHARE"]


def changes_alarm_threshold_raised(t):
    props(t, "ChangesInconsistentAlarm")["Threshold"] = 10


def changes_alarm_on_pending(t):
    props(t, "ChangesInconsistentAlarm")["MetricName"] = "ChangesPending"


def changes_alarm_breaches_on_missing_data(t):
    props(t, "ChangesInconsistentAlarm")["TreatMissingData"] = "breaching"


def dashboard_without_weekly_nines(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('"period": 604800, "visible": false', '"period": 86400, "visible": false'))


def dashboard_nines_over_pending(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace(
        '"ChangesInconsistent", "Service", "${AWS::StackName}", "Function", "inspector", {"id": "inc", "period": 86400',
        '"ChangesPending", "Service", "${AWS::StackName}", "Function", "inspector", {"id": "inc", "period": 86400', 1))


def dashboard_without_pending_age(t):
    set_dashboard_text(t, dashboard_text(t)[0].replace('"PendingChangeAge"', '"ChangesPending"'))


# ---- ElastiCache Serverless (CacheType serverless) ------------------------------------------------


def serverless_branch(node):
    """The serverless value of an !If [ServerlessCacheType, serverless, nodes]."""
    cond, yes, _ = node["Fn::If"]
    assert cond == "ServerlessCacheType"
    return yes


def set_serverless_branch(node, value):
    node["Fn::If"][1] = value


def env_of(t, function):
    return props(t, function)["Environment"]["Variables"]


def serverless_confirms_from_the_shards(t):
    # What the template did before: a serverless cache has no WAIT, so the invalidator refuses
    # to start with REDIS_CONFIRM_REPLICAS above 0.
    env_of(t, INVALIDATOR)["REDIS_CONFIRM_REPLICAS"] = {"Ref": "CacheReplicasPerShard"}


def serverless_without_cache_type(t):
    del env_of(t, READ)["REDIS_CACHE_TYPE"]


def serverless_told_it_is_nodes(t):
    env_of(t, INVALIDATOR)["REDIS_CACHE_TYPE"] = "nodes"


def serverless_plain_redis_url(t):
    set_serverless_branch(env_of(t, c.INSPECTOR)["REDIS_URL"], {
        "Fn::Sub": "redis://${ServerlessCache.Endpoint.Address}:${ServerlessCache.Endpoint.Port}"
    })


def serverless_url_without_the_port(t):
    set_serverless_branch(env_of(t, READ)["REDIS_URL"], {"Fn::Sub": "rediss://${ServerlessCache.Endpoint.Address}"})


def serverless_signs_for_the_replication_group(t):
    inner = env_of(t, READ)["REDIS_IAM_CACHE_NAME"]["Fn::If"][1]
    set_serverless_branch(inner, {"Ref": "CacheReplicationGroupId"})


def connect_on_every_serverless_cache(t):
    set_serverless_branch(connect_statement(t, "ReadFunctionRole")["Resource"][0], {
        "Fn::Sub": "arn:${AWS::Partition}:elasticache:${AWS::Region}:${AWS::AccountId}:serverlesscache:*"
    })


def serverless_connects_to_the_replication_group(t):
    # Both ARNs whatever the type: with CacheType serverless the grant names a group that
    # does not exist (or another stack's of that name).
    statement = connect_statement(t, "InvalidatorFunctionRole")
    statement["Resource"].append({"Fn::Sub": c.REPLICATION_GROUP_ARN})


def nodes_connect_to_the_serverless_cache(t):
    statement = connect_statement(t, "InspectorFunctionRole")
    statement["Resource"][0]["Fn::If"][2] = {"Fn::Sub": c.SERVERLESS_CACHE_ARN}


def serverless_user_beyond_the_readme_acl(t):
    # Only with a serverless cache: the functions' user gets every key.
    access = props(t, IAM_USER)["AccessString"]
    props(t, IAM_USER)["AccessString"] = {
        "Fn::If": ["ServerlessCacheType", access.replace("~product:*", "~*"), access]
    }


def serverless_in_token_mode(t):
    del t["Rules"]["ServerlessNeedsIamAuth"]


def serverless_rule_on_the_wrong_mode(t):
    t["Rules"]["ServerlessNeedsIamAuth"]["Assertions"][0]["Assert"] = {
        "Fn::Equals": [{"Ref": "CacheAuthMode"}, "token"]
    }


def serverless_by_default(t):
    t["Parameters"]["CacheType"]["Default"] = "serverless"


def serverless_keeps_the_replication_group(t):
    del t["Resources"][CACHE]["Condition"]


def serverless_keeps_the_parameter_group(t):
    del t["Resources"]["CacheParameterGroup"]["Condition"]


def serverless_without_the_user_group(t):
    del props(t, c.SERVERLESS)["UserGroupId"]


def serverless_on_the_default_security_group(t):
    del props(t, c.SERVERLESS)["SecurityGroupIds"]


def serverless_in_the_default_subnets(t):
    del props(t, c.SERVERLESS)["SubnetIds"]


def serverless_without_an_ecpu_limit(t):
    del props(t, c.SERVERLESS)["CacheUsageLimits"]["ECPUPerSecond"]


def serverless_storage_in_a_fixed_size(t):
    props(t, c.SERVERLESS)["CacheUsageLimits"]["DataStorage"]["Maximum"] = 5000


def serverless_keeps_snapshots(t):
    props(t, c.SERVERLESS)["SnapshotRetentionLimit"] = 7
    props(t, c.SERVERLESS)["DailySnapshotTime"] = "04:00"


def serverless_other_engine(t):
    props(t, c.SERVERLESS)["Engine"] = "redis"


def no_throttled_commands_alarm(t):
    del t["Resources"]["ServerlessThrottledCommandsAlarm"]


def node_alarm_on_serverless(t):
    del t["Resources"]["CacheEngineCpuAlarm"]["Condition"]


def under_replication_alarm_on_serverless(t):
    del t["Resources"]["UnderReplicatedBatchesAlarm"]["Condition"]


def serverless_alarm_by_node_dimension(t):
    props(t, "ServerlessEvictionsAlarm")["Dimensions"][0]["Name"] = "CacheClusterId"


def ecpu_alarm_at_the_limit(t):
    props(t, "ServerlessEcpuAlarm")["Threshold"] = 100


def storage_alarm_in_kilobytes(t):
    # A unit slip in the expression: the alarm would never fire.
    m = props(t, "ServerlessStorageAlarm")["Metrics"][0]
    m["Expression"]["Fn::Sub"] = m["Expression"]["Fn::Sub"].replace("1000000000", "1000000000000")


def latency_alarm_on_the_average(t):
    props(t, "ServerlessReadLatencyAlarm")["Metrics"][1]["MetricStat"]["Stat"] = "Average"


def serverless_alarm_without_description(t):
    props(t, "ServerlessWriteLatencyAlarm")["AlarmDescription"] = "Write latency."


def no_reader_endpoint_ingress(t):
    del t["Resources"]["CacheReaderIngress"]


def reader_endpoint_port_on_nodes(t):
    del t["Resources"]["CacheReaderIngress"]["Condition"]


def no_reader_endpoint_egress(t):
    del t["Resources"]["FunctionToCacheReaderEgress"]


def dashboard_without_throttled_commands(t):
    sub = cache_widgets(t, "serverless")
    sub[0] = sub[0].replace('"ThrottledCmds"', '"CurrConnections"')


def dashboard_latency_on_the_average(t):
    sub = cache_widgets(t, "serverless")
    sub[0] = sub[0].replace('"stat": "p99"', '"stat": "Average"')


def dashboard_node_graphs_on_serverless(t):
    widgets = dashboard_text(t)[1]
    widgets["CacheWidgets"] = widgets["CacheWidgets"]["Fn::If"][1]


def no_cache_endpoint_output(t):
    del t["Outputs"]["CacheEndpoint"]


def cache_endpoint_output_of_the_nodes_only(t):
    t["Outputs"]["CacheEndpoint"]["Value"] = t["Outputs"]["CacheConfigurationEndpoint"]["Value"]


# An alarm's description, which ends by naming its runbook section.
def runbook_link(t, alarm):
    return props(t, alarm)["AlarmDescription"].rsplit("Runbook: ", 1)


def alarm_added_without_a_runbook(t):
    t["Resources"]["ReadFunctionDurationAlarm"] = copy.deepcopy(t["Resources"]["ReadFunctionErrorsAlarm"])
    props(t, "ReadFunctionDurationAlarm")["MetricName"] = "Duration"
    props(t, "ReadFunctionDurationAlarm")["AlarmDescription"] = (
        "The read function is slow. Runbook: docs/runbooks.md#readfunctiondurationalarm"
    )


def serverless_alarm_added_without_a_runbook(t):
    t["Resources"]["ServerlessConnectionsAlarm"] = copy.deepcopy(t["Resources"]["ServerlessThrottledCommandsAlarm"])
    props(t, "ServerlessConnectionsAlarm")["MetricName"] = "CurrConnections"


def description_names_a_missing_section(t):
    text, _ = runbook_link(t, "CacheEvictionsAlarm")
    props(t, "CacheEvictionsAlarm")["AlarmDescription"] = text + "Runbook: docs/runbooks.md#cacheevictionalarm"


def description_names_another_alarms_section(t):
    text, _ = runbook_link(t, "ServerlessEvictionsAlarm")
    props(t, "ServerlessEvictionsAlarm")["AlarmDescription"] = text + "Runbook: docs/runbooks.md#cacheevictionsalarm"


def description_without_its_runbook(t):
    text, _ = runbook_link(t, "InvalidationLagAlarm")
    props(t, "InvalidationLagAlarm")["AlarmDescription"] = text.rstrip()


def description_names_its_runbook_on_nodes_only(t):
    description = props(t, "BypassRateAlarm")["AlarmDescription"]
    text, _ = runbook_link(t, "BypassRateAlarm")
    props(t, "BypassRateAlarm")["AlarmDescription"] = {"Fn::If": ["NodeBasedCache", description, text.rstrip()]}


def runbook_of_a_removed_alarm(t):
    del t["Resources"]["MalformedRecordsAlarm"]


def dashboard_graph_a_runbook_names_renamed(t):
    text = dashboard_text(t)[0]
    assert text.count('"title": "Hit ratio (%)"') == 1
    set_dashboard_text(t, text.replace('"title": "Hit ratio (%)"', '"title": "Hits (%)"'))


WEAKENED = [
    (unconfirmed_invalidations, c.check_environment),
    (drop_report_batch_item_failures, c.check_stream_event_source),
    (drop_bisect, c.check_stream_event_source),
    (unbounded_retries, c.check_stream_event_source),
    (retries_parameter_allows_forever, c.check_stream_event_source),
    (infinite_record_age, c.check_stream_event_source),
    (drop_on_failure, c.check_stream_event_source),
    (record_age_below_ttl, c.check_record_age_covers_ttl),
    (read_can_put_item, c.check_read_function_policies),
    (read_can_query, c.check_read_function_policies),
    (read_on_every_table, c.check_read_function_policies),
    (read_with_wildcard_action, c.check_read_function_policies),
    (read_without_batch_get_item, c.check_read_function_policies),
    (read_batch_gets_every_table, c.check_read_function_policies),
    (read_batch_gets_another_table, c.check_read_function_policies),
    (inspector_without_batch_get_item, c.check_inspector_policies),
    (inspector_batch_gets_every_table, c.check_inspector_policies),
    (no_batch_route, c.check_read_routes),
    (batch_route_on_any_method, c.check_read_routes),
    (batch_route_on_the_implicit_api, c.check_read_routes),
    (catch_all_route, c.check_read_routes),
    (read_through_a_separate_policy, c.check_read_function_policies),
    (read_with_sam_policy_template, c.check_read_function_policies),
    (read_with_broad_managed_policy, c.check_read_function_policies),
    (invalidator_can_delete_items, c.check_invalidator_policies),
    (invalidator_reads_every_stream, c.check_invalidator_policies),
    (cache_without_tls, c.check_replication_group),
    (cache_tls_preferred_only, c.check_replication_group),
    (cache_without_at_rest_encryption, c.check_replication_group),
    (cache_without_failover, c.check_replication_group),
    (cache_single_az, c.check_replication_group),
    (cache_may_have_no_replica, c.check_replication_group),
    (cache_token_in_template, c.check_replication_group),
    (cache_token_from_parameter, c.check_replication_group),
    (token_may_contain_at_sign, c.check_auth_secret),
    (token_too_long, c.check_auth_secret),
    (egress_to_the_internet, c.check_security_groups),
    (ipv6_ingress_to_the_cache, c.check_security_groups),
    (cache_group_keeps_default_egress, c.check_security_groups),
    (functions_accept_connections, c.check_security_groups),
    (table_without_pitr, c.check_table),
    (table_without_sse, c.check_table),
    (table_keys_only_stream, c.check_table),
    (table_deleted_with_stack, c.check_table),
    (queue_unencrypted, c.check_failure_queue_encrypted),
    (read_function_on_x86, c.check_function_build),
    (invalidator_on_old_runtime, c.check_function_build),
    (build_without_cargo_lambda, c.check_function_build),
    (build_a_binary_that_does_not_exist, c.check_function_build),
    (no_gateway_endpoint, c.check_vpc_endpoints),
    (gateway_without_batch_get_item, c.check_vpc_endpoints),
    (gateway_allows_scan, c.check_vpc_endpoints),
    (gateway_on_every_table, c.check_vpc_endpoints),
    (gateway_policy_everywhere, c.check_vpc_endpoints),
    (secrets_endpoint_without_private_dns, c.check_vpc_endpoints),
    (table_name_ignores_existing_table, c.check_conditional_references),
    (subnet_group_ignores_existing_vpc, c.check_conditional_references),
    (plain_redis_url, c.check_environment),
    (eventually_consistent_reads, c.check_environment),
    (no_iterator_age_alarm, c.check_alarms),
    (no_evictions_alarm, c.check_alarms),
    (cache_alarm_misses_third_shard, c.check_cache_alarm_topology),
    (evictions_alarm_misses_third_shard, c.check_cache_alarm_topology),
    (cache_alarm_watches_a_shard_too_early, c.check_cache_alarm_topology),
    (no_reserved_concurrency, c.check_function_sizing),
    (read_timeout_beyond_api_gateway, c.check_function_sizing),
    (no_api_url_output, c.check_outputs),
    (skip_without_reason, c.check_checkov_skips),
    (iam_mode_without_connect, c.check_auth_modes),
    (iam_connect_on_every_resource, c.check_auth_modes),
    (iam_connect_on_every_resource, c.check_read_function_policies),
    (iam_connect_on_every_user, c.check_auth_modes),
    (iam_connect_on_every_user, c.check_invalidator_policies),
    (iam_connect_without_the_user, c.check_auth_modes),
    (iam_connect_with_more_actions, c.check_auth_modes),
    (iam_connect_with_more_actions, c.check_read_function_policies),
    (token_mode_grants_connect, c.check_auth_modes),
    (token_mode_grants_connect, c.check_conditional_references),
    (iam_user_with_password, c.check_auth_modes),
    (iam_user_with_every_command, c.check_auth_modes),
    (iam_user_name_differs_from_id, c.check_auth_modes),
    (group_with_the_builtin_default_user, c.check_auth_modes),
    (default_user_enabled, c.check_auth_modes),
    (group_without_a_default_user, c.check_auth_modes),
    (iam_mode_keeps_the_auth_token, c.check_auth_modes),
    (iam_mode_without_the_user_group, c.check_auth_modes),
    (iam_mode_keeps_the_secret, c.check_auth_modes),
    (iam_mode_keeps_the_secret_arn, c.check_auth_modes),
    (iam_mode_without_the_user_variable, c.check_auth_modes),
    (iam_mode_signs_for_another_group, c.check_auth_modes),
    (iam_mode_names_the_cache_twice, c.check_auth_modes),
    (iam_is_the_default, c.check_auth_modes),
    (secret_referenced_outside_token_mode, c.check_conditional_references),
    (open_egress_under_a_condition, c.check_security_groups),
    (secrets_egress_in_iam_mode, c.check_auth_modes),
    (inspector_key_type_drifts, c.check_inspector),
    (inspector_without_version_attribute, c.check_inspector),
    (inspector_signs_as_the_functions_user, c.check_inspector),
    (inspector_signs_as_the_functions_user, c.check_auth_modes),
    (inspector_schedule_not_the_interval, c.check_inspector),
    (interval_mapping_disagrees, c.check_inspector),
    (inspector_repairs_by_default, c.check_inspector),
    (inspector_timeout_within_grace, c.check_inspector),
    (inspector_timeout_covers_one_grace, c.check_inspector),
    (inspector_reserves_one_by_default, c.check_inspector),
    (inspector_reservation_one_or_none, c.check_inspector),
    (inspector_reservation_unbounded, c.check_inspector),
    (inspector_reservation_fixed, c.check_inspector),
    (inspector_reservation_condition_on_one_only, c.check_inspector),
    (inspector_without_invalidator_factor, c.check_inspector),
    (inspector_assumes_factor_one, c.check_inspector),
    (invalidator_factor_apart_from_the_inspectors, c.check_inspector),
    (inspector_can_put_item, c.check_inspector_policies),
    (inspector_connects_as_the_functions_user, c.check_inspector_policies),
    (inspector_connects_as_the_functions_user, c.check_auth_modes),
    (inspector_user_may_flushall, c.check_auth_modes),
    (inspector_user_on_every_key, c.check_auth_modes),
    (functions_user_gets_randomkey, c.check_auth_modes),
    (inspector_user_not_in_group, c.check_auth_modes),
    (service_is_not_the_stack, c.check_metrics_environment),
    (inspector_without_namespace, c.check_metrics_environment),
    (namespace_may_be_off, c.check_metrics_environment),
    (inconsistency_threshold_raised, c.check_metric_alarms),
    (inconsistency_period_not_the_interval, c.check_metric_alarms),
    (heartbeat_ignores_missing_data, c.check_metric_alarms),
    (heartbeat_fires_on_a_present_zero, c.check_metric_alarms),
    (no_heartbeat, c.check_metric_alarms),
    (no_inspector_errors_alarm, c.check_metric_alarms),
    (bypass_rate_inverted, c.check_metric_alarms),
    (bypass_rate_without_volume_guard, c.check_metric_alarms),
    (bypass_rate_breaches_on_missing_data, c.check_metric_alarms),
    (lag_alarm_on_the_average, c.check_metric_alarms),
    (lag_threshold_within_the_rounding, c.check_metric_alarms),
    (lag_threshold_beyond_the_grace_period, c.check_metric_alarms),
    (alarm_on_a_metric_nobody_emits, c.check_metric_alarms),
    (alarm_without_the_topic, c.check_metric_alarms),
    (dashboard_not_json, c.check_dashboard),
    (dashboard_metric_typo, c.check_dashboard),
    (dashboard_other_service, c.check_dashboard),
    (dashboard_without_lag_p99, c.check_dashboard),
    (dashboard_without_iterator_age, c.check_dashboard),
    (dashboard_misses_third_shard, c.check_dashboard),
    (dashboard_evictions_miss_third_shard, c.check_dashboard),
    (dashboard_expression_without_its_metric, c.check_dashboard),
    (dashboard_without_batch_size_p99, c.check_dashboard),
    (dashboard_batch_reads_of_the_invalidator, c.check_dashboard),
    (no_monitor_mapping, c.check_change_monitor),
    (monitor_mapping_always_created, c.check_change_monitor),
    (monitor_off_by_default, c.check_change_monitor),
    (monitor_replays_the_stream, c.check_change_monitor),
    (monitor_small_batches, c.check_change_monitor),
    (monitor_without_batching_window, c.check_change_monitor),
    (monitor_parallel_batches_per_shard, c.check_change_monitor),
    (monitor_retries_forever, c.check_change_monitor),
    (monitor_keeps_records_a_day, c.check_change_monitor),
    (monitor_bisects, c.check_change_monitor),
    (monitor_reports_item_failures, c.check_change_monitor),
    (monitor_reads_another_stream, c.check_change_monitor),
    (monitor_reads_another_stream, c.check_conditional_references),
    (third_stream_reader, c.check_change_monitor),
    (inspector_reads_every_stream, c.check_inspector_policies),
    (inspector_lists_every_stream, c.check_inspector_policies),
    (inspector_stream_grant_without_get_records, c.check_inspector_policies),
    (inspector_stream_grant_without_get_records, c.check_change_monitor),
    (inspector_stream_grant_without_the_monitor, c.check_change_monitor),
    (share_may_be_zero, c.check_change_monitor),
    (share_not_passed, c.check_inspector),
    (changes_alarm_threshold_raised, c.check_metric_alarms),
    (changes_alarm_on_pending, c.check_metric_alarms),
    (changes_alarm_breaches_on_missing_data, c.check_metric_alarms),
    (dashboard_without_weekly_nines, c.check_dashboard),
    (dashboard_nines_over_pending, c.check_dashboard),
    (dashboard_without_pending_age, c.check_dashboard),
    (serverless_confirms_from_the_shards, c.check_environment),
    (serverless_without_cache_type, c.check_environment),
    (serverless_told_it_is_nodes, c.check_environment),
    (serverless_plain_redis_url, c.check_environment),
    (serverless_url_without_the_port, c.check_environment),
    (serverless_signs_for_the_replication_group, c.check_auth_modes),
    (connect_on_every_serverless_cache, c.check_auth_modes),
    (connect_on_every_serverless_cache, c.check_read_function_policies),
    (serverless_connects_to_the_replication_group, c.check_auth_modes),
    (serverless_connects_to_the_replication_group, c.check_invalidator_policies),
    (serverless_connects_to_the_replication_group, c.check_conditional_references),
    (nodes_connect_to_the_serverless_cache, c.check_auth_modes),
    (nodes_connect_to_the_serverless_cache, c.check_inspector_policies),
    (serverless_user_beyond_the_readme_acl, c.check_auth_modes),
    (serverless_in_token_mode, c.check_serverless_requires_iam),
    (serverless_rule_on_the_wrong_mode, c.check_serverless_requires_iam),
    (serverless_by_default, c.check_serverless_requires_iam),
    (serverless_keeps_the_replication_group, c.check_serverless_cache),
    (serverless_keeps_the_parameter_group, c.check_serverless_cache),
    (serverless_without_the_user_group, c.check_serverless_cache),
    (serverless_without_the_user_group, c.check_auth_modes),
    (serverless_on_the_default_security_group, c.check_serverless_cache),
    (serverless_in_the_default_subnets, c.check_serverless_cache),
    (serverless_without_an_ecpu_limit, c.check_serverless_cache),
    (serverless_storage_in_a_fixed_size, c.check_serverless_cache),
    (serverless_keeps_snapshots, c.check_serverless_cache),
    (serverless_other_engine, c.check_serverless_cache),
    (no_throttled_commands_alarm, c.check_serverless_alarms),
    (node_alarm_on_serverless, c.check_serverless_alarms),
    (node_alarm_on_serverless, c.check_conditional_references),
    (under_replication_alarm_on_serverless, c.check_serverless_alarms),
    (serverless_alarm_by_node_dimension, c.check_serverless_alarms),
    (ecpu_alarm_at_the_limit, c.check_serverless_alarms),
    (storage_alarm_in_kilobytes, c.check_serverless_alarms),
    (latency_alarm_on_the_average, c.check_serverless_alarms),
    (serverless_alarm_without_description, c.check_serverless_alarms),
    (no_reader_endpoint_ingress, c.check_security_groups),
    (reader_endpoint_port_on_nodes, c.check_security_groups),
    (no_reader_endpoint_egress, c.check_security_groups),
    (dashboard_without_throttled_commands, c.check_dashboard),
    (dashboard_latency_on_the_average, c.check_dashboard),
    (dashboard_node_graphs_on_serverless, c.check_dashboard),
    (dashboard_node_graphs_on_serverless, c.check_conditional_references),
    (no_cache_endpoint_output, c.check_outputs),
    (cache_endpoint_output_of_the_nodes_only, c.check_outputs),
    (alarm_added_without_a_runbook, c.check_runbooks),
    (serverless_alarm_added_without_a_runbook, c.check_runbooks),
    (description_names_a_missing_section, c.check_runbooks),
    (description_names_another_alarms_section, c.check_runbooks),
    (description_without_its_runbook, c.check_runbooks),
    (description_names_its_runbook_on_nodes_only, c.check_runbooks),
    (runbook_of_a_removed_alarm, c.check_runbooks),
    (dashboard_graph_a_runbook_names_renamed, c.check_runbooks),
]


@pytest.mark.parametrize(
    "weaken,check", WEAKENED, ids=[f"{w.__name__}-{c_.__name__}" for w, c_ in WEAKENED]
)
def test_weakened_template_fails(weaken, check, template):
    assert check(template) == [], "the template itself must pass before it is weakened"
    weakened = copy.deepcopy(template)
    weaken(weakened)
    problems = check(weakened)
    assert problems, f"{check.__name__} did not notice {weaken.__name__}"


def test_every_check_has_a_weakened_case():
    covered = {check for _, check in WEAKENED}
    assert set(c.ALL_CHECKS) - covered == set()


# What check_runbooks must say of each weakened template above: (weakening, a problem's words).
RUNBOOK_PROBLEMS = [
    (alarm_added_without_a_runbook, "ReadFunctionDurationAlarm has no section in docs/runbooks.md"),
    (serverless_alarm_added_without_a_runbook, "ServerlessConnectionsAlarm has no section in docs/runbooks.md"),
    (description_names_a_missing_section, "names runbook section #cacheevictionalarm, its own is #cacheevictionsalarm"),
    (description_names_another_alarms_section,
     "names runbook section #cacheevictionsalarm, its own is #serverlessevictionsalarm"),
    (description_without_its_runbook, "InvalidationLagAlarm (CacheType=nodes, ChangeMonitor=enabled): AlarmDescription must end with"),
    (description_names_its_runbook_on_nodes_only, "BypassRateAlarm (CacheType=serverless, ChangeMonitor=enabled): AlarmDescription must end with"),
    (runbook_of_a_removed_alarm, "has a section for MalformedRecordsAlarm, which the template no longer has"),
    (dashboard_graph_a_runbook_names_renamed, "names the graph 'Hit ratio (%)', which the dashboard does not have"),
]


@pytest.mark.parametrize("weaken,words", RUNBOOK_PROBLEMS, ids=[w.__name__ for w, _ in RUNBOOK_PROBLEMS])
def test_runbook_problems_name_the_alarm(weaken, words, template):
    """Each weakening is reported for what it is, naming the alarm and the section."""
    weaken(template)
    problems = c.check_runbooks(template)
    assert any(words in p for p in problems), problems


# Edits of docs/runbooks.md, in memory, that check_runbooks must report on the real template:
# (name, [(text, replacement)], a problem's words).
RUNBOOK_EDITS = [
    ("section_removed", [("### ServerlessWriteLatencyAlarm\n", "### Serverless write latency\n")],
     "ServerlessWriteLatencyAlarm has no section in docs/runbooks.md"),
    ("section_for_an_alarm_that_never_was", [("### CacheMemoryAlarm\n", "### CacheMemoryAlarm\n\n### CacheSwapAlarm\n")],
     "has a section for CacheSwapAlarm, which the template no longer has"),
    ("section_twice", [("### InspectorErrorsAlarm\n", "### InspectorErrorsAlarm\n\n### InspectorErrorsAlarm\n")],
     "has the heading 'InspectorErrorsAlarm' more than once"),
    ("section_without_what_not_to_do", [("**Do not.** Do not raise the heartbeat's periods", "Never raise the heartbeat's periods")],
     "#inspectorheartbeatalarm has no **Do not.** part"),
    ("graph_misspelt", [('**"Invalidator iterator age (ms)"** (rising', '**"Invalidator iterator age (s)"** (rising')],
     "names the graph 'Invalidator iterator age (s)', which the dashboard does not have"),
]


@pytest.mark.parametrize("edits,words", [(e, w) for _, e, w in RUNBOOK_EDITS], ids=[n for n, _, _ in RUNBOOK_EDITS])
def test_weakened_runbooks_fail(edits, words, template):
    text = c.RUNBOOKS_PATH.read_text()
    assert c.check_runbooks(template, text) == []
    for old, new in edits:
        assert text.count(old) == 1, f"docs/runbooks.md no longer has {old!r}: update this test"
        text = text.replace(old, new)
    problems = c.check_runbooks(template, text)
    assert any(words in p for p in problems), problems


# ---- the template against the code and against SAM ---------------------------------------------


def test_every_environment_variable_is_read_by_the_code(template):
    """A variable the template sets but no Rust source names would be silently ignored."""
    assert c.env_names_missing_from_code(template) == set()


def test_emitted_metrics_match_the_code():
    """The metric list the alarm and dashboard checks use is the one the functions emit: every
    recorder of each function, the inspector's sample and change monitor alike."""
    assert c.emitted_metrics_in_code() == c.EMITTED


def test_the_heartbeat_comes_from_runs_only():
    """InspectorHeartbeatAlarm's KeysChecked is written by the sample's recorder, which writes
    none of the change monitor's metrics: a stream batch's line never feeds the heartbeat, so a
    busy change monitor cannot hide a schedule that stopped."""
    recorders = [metrics for fn, metrics in c.recorders_in_code() if fn == "inspector"]
    monitor = {"ChangesChecked", "ChangesInconsistent", "ChangesPending", "ChangesSuperseded",
               "ChangesUnchecked", "PendingChangeAge"}
    (sample,) = [m for m in recorders if "KeysChecked" in m]
    assert sample & monitor == set(), sample
    assert any(monitor <= m for m in recorders), recorders


def test_every_metric_the_template_reads_is_emitted(template):
    """Each metric of the functions that an alarm watches or the dashboard graphs is one the
    code emits (read from the Rust sources, not from EMITTED)."""
    assert c.unemitted_metrics(template, c.emitted_metrics_in_code()) == []


# Edits of the Rust sources, in memory, that leave metrics the template reads unemitted:
# (file under crates/product-cache/src, [(text, replacement)], a metric the template then lacks).
UNEMITTING_EDITS = [
    # The change monitor's recorder gone (its counts through the sample's recorder, which
    # declares none of them): every Changes* metric is missing.
    ("inspect.rs", [("Recorder::off(\"inspector\", &crate::metrics::monitor::ALL)",
                     "Recorder::off(\"inspector\", &crate::metrics::inspector::ALL)")], "ChangesInconsistent"),
    # A metric dropped from the change monitor's array.
    ("metrics.rs", [("pub const ALL: [Metric; 6] = [", "pub const ALL: [Metric; 5] = ["),
                    ("        PENDING_AGE,\n    ];", "    ];")], "PendingChangeAge"),
    # The sample's recorder gone: the heartbeat's KeysChecked is missing.
    ("inspect.rs", [("Recorder::off(\"inspector\", &crate::metrics::inspector::ALL)",
                     "Recorder::off(\"inspector\", &crate::metrics::monitor::ALL)")], "KeysChecked"),
]


@pytest.mark.parametrize("file,edits,metric", UNEMITTING_EDITS, ids=[e[2] for e in UNEMITTING_EDITS])
def test_a_metric_the_code_stops_emitting_is_noticed(template, file, edits, metric):
    files = c.rust_sources()
    path = c.RUST_SRC / file
    for text, replacement in edits:
        assert files[path].count(text) == 1, f"{file} no longer has {text!r}: update this test"
        files[path] = files[path].replace(text, replacement)
    problems = c.unemitted_metrics(template, c.emitted_metrics_in_code(files))
    assert any(f"inspector {metric}," in p for p in problems), problems


def test_an_unreadable_recorder_fails_the_metric_list():
    """A recorder whose metrics cannot be read from the sources raises rather than being left
    out, so the metric list never silently shrinks."""
    files = c.rust_sources()
    path = c.RUST_SRC / "inspect.rs"
    files[path] = files[path].replace("&crate::metrics::monitor::ALL", "&crate::metrics::monitor::EVERYTHING", 1)
    with pytest.raises(ValueError, match="no such array"):
        c.emitted_metrics_in_code(files)


def sam_transformed(template):
    """The template's resources after the real SAM transform, as `sam deploy` runs it."""
    transform_mod = pytest.importorskip("samtranslator.translator.transform")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    t = copy.deepcopy(template)
    for r in t["Resources"].values():
        if r["Type"] == "AWS::Serverless::Function":
            r["Properties"]["CodeUri"] = "s3://bucket/key.zip"  # what `sam package` substitutes

    class Policies:
        def load(self):
            return {}

    return transform_mod.transform(t, {}, Policies())["Resources"]


def test_sam_transform_adds_no_permissions(template):
    """The real SAM transform (as `sam deploy` runs it) keeps the explicit roles as the only
    grants: no generated role, no AWSLambdaDynamoDBExecutionRole (stream actions on every stream),
    the invalidator's event source mapping carries every safety setting through, and the change
    monitor's mapping (the stream's second reader, under its condition) comes through as written."""
    out = sam_transformed(template)
    roles = {n for n, r in out.items() if r["Type"] == "AWS::IAM::Role"}
    assert roles == {"ReadFunctionRole", "InvalidatorFunctionRole", "InspectorFunctionRole"}
    assert not [n for n, r in out.items() if r["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy")]
    mappings = {json.dumps(r["Properties"]["FunctionName"]): (n, r) for n, r in out.items()
                if r["Type"] == "AWS::Lambda::EventSourceMapping"}
    assert set(mappings) == {json.dumps({"Ref": INVALIDATOR}), json.dumps({"Ref": c.INSPECTOR})}, sorted(mappings)
    monitor_name, monitor = mappings[json.dumps({"Ref": c.INSPECTOR})]
    assert monitor_name == "ChangeMonitorMapping" and monitor["Condition"] == "MonitorChanges"
    for key, want in c.MONITOR_SETTINGS.items():
        assert monitor["Properties"][key] == want, key
    assert "FunctionResponseTypes" not in monitor["Properties"]
    esm = mappings[json.dumps({"Ref": INVALIDATOR})][1]["Properties"]
    assert esm["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert esm["BisectBatchOnFunctionError"] is True
    assert esm["StartingPosition"] == "TRIM_HORIZON"
    for key in ("MaximumRetryAttempts", "MaximumRecordAgeInSeconds", "BatchSize",
                "MaximumBatchingWindowInSeconds", "ParallelizationFactor"):
        assert key in esm, key
    assert esm["DestinationConfig"]["OnFailure"]["Destination"] == {
        "Fn::GetAtt": ["StreamFailureQueue", "Arn"]
    }
    for name in ("ReadFunction", "InvalidatorFunction", "InspectorFunction"):
        fn = out[name]["Properties"]
        assert fn["Architectures"] == ["arm64"] and fn["Runtime"] == "provided.al2023"
        assert fn["Role"] == {"Fn::GetAtt": [f"{name}Role", "Arn"]}
    # Invoking is granted to API Gateway (the read function) and to the inspector's schedule
    # rule only, each on its own function and source.
    permissions = {
        r["Properties"]["Principal"]: r["Properties"]
        for r in out.values() if r["Type"] == "AWS::Lambda::Permission"
    }
    assert set(permissions) == {"apigateway.amazonaws.com", "events.amazonaws.com"}
    assert permissions["apigateway.amazonaws.com"]["FunctionName"] == {"Ref": "ReadFunction"}
    events = permissions["events.amazonaws.com"]
    assert events["FunctionName"] == {"Ref": "InspectorFunction"}
    (rule_name, rule), = [(n, r["Properties"]) for n, r in out.items() if r["Type"] == "AWS::Events::Rule"]
    assert events["SourceArn"] == {"Fn::GetAtt": [rule_name, "Arn"]}
    assert rule["ScheduleExpression"] == {
        "Fn::FindInMap": ["InspectorIntervals", {"Ref": "InspectorIntervalMinutes"}, "Rate"]
    }
    assert [tg["Arn"] for tg in rule["Targets"]] == [{"Fn::GetAtt": ["InspectorFunction", "Arn"]}]
    # A failed run is not retried (the schedule is the retry).
    (invoke_config,) = [r["Properties"] for r in out.values() if r["Type"] == "AWS::Lambda::EventInvokeConfig"]
    assert invoke_config["MaximumRetryAttempts"] == 0


def test_sam_transform_routes_both_paths_to_the_read_function(template):
    """The HTTP API SAM generates has exactly the read function's two routes, GET /products/{id}
    and GET /products (the batch), each integrated with the read function, and API Gateway may
    invoke the function through those two routes only."""
    out = sam_transformed(template)
    api = out[c.API]
    assert api["Type"] == "AWS::ApiGatewayV2::Api"
    paths = api["Properties"]["Body"]["paths"]
    assert {path: sorted(methods) for path, methods in paths.items()} == {
        "/products/{id}": ["get"],
        "/products": ["get"],
    }
    for path, methods in paths.items():
        integration = methods["get"]["x-amazon-apigateway-integration"]
        assert READ in json.dumps(integration["uri"]), (path, integration)
        # The handler reads payload v2 (`routeKey`, `rawQueryString`).
        assert integration["payloadFormatVersion"] == "2.0", (path, integration)
    sources = sorted(
        json.dumps(r["Properties"]["SourceArn"])
        for r in out.values()
        if r["Type"] == "AWS::Lambda::Permission"
        and r["Properties"]["Principal"] == "apigateway.amazonaws.com"
    )
    assert len(sources) == 2, sources
    assert any(s_.count("/GET/products/") == 1 for s_ in sources), sources
    assert any(re.search(r"/GET/products\"", s_) for s_ in sources), sources
