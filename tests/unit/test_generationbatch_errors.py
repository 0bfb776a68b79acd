"""The GenerationBatch controller's reading of API errors: which refusals mean the namespace is going."""

from __future__ import annotations

import json

from kubernetes.client.rest import ApiException

from sd_operator.kube import namespace_going


def error(status: int, body: dict[str, object] | str) -> ApiException:
    e = ApiException(status=status, reason="x")
    e.body = body if isinstance(body, str) else json.dumps(body)
    return e


# What kube-apiserver answers when a namespace being deleted gets new content (NamespaceLifecycle).
TERMINATING = {
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "message": 'configmaps "b7-batch" is forbidden: unable to create new content in namespace t-1 '
    "because it is being terminated",
    "reason": "Forbidden",
    "details": {
        "name": "b7-batch",
        "kind": "configmaps",
        "causes": [
            {
                "reason": "NamespaceTerminating",
                "message": "namespace t-1 is being terminated",
                "field": "metadata.namespace",
            }
        ],
    },
    "code": 403,
}


def test_a_terminating_namespace_is_going() -> None:
    assert namespace_going(error(403, TERMINATING))


def test_the_cause_alone_or_the_message_alone_is_enough() -> None:
    assert namespace_going(error(403, {**TERMINATING, "message": "forbidden"}))
    assert namespace_going(error(403, {**TERMINATING, "details": {}}))


def test_a_namespace_already_gone_is_going() -> None:
    assert namespace_going(error(404, {"kind": "Status", "reason": "NotFound", "code": 404}))


def test_other_refusals_are_errors() -> None:
    rbac = {"kind": "Status", "reason": "Forbidden", "message": 'configmaps "x" is forbidden: User cannot patch'}
    assert not namespace_going(error(403, rbac))
    assert not namespace_going(error(403, "not json"))
    assert not namespace_going(error(403, ""))
    assert not namespace_going(error(409, TERMINATING))
    assert not namespace_going(error(500, TERMINATING))
