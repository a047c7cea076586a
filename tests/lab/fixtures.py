"""pytest fixtures for the lab. Use them from a conftest::

    # tests/conftest.py
    from tests.lab.fixtures import fake_imds, imds_lab, imds_lab_required, lab_factory  # noqa: F401

Fixtures:
    fake_imds          in-process `FakeIMDS` on 127.0.0.1 (AWS) and 127.0.0.2 (Alibaba), free
                       ports, optional mode; ``fake_imds.addresses`` -> [(host, port), ...].
    imds_lab           a module-scoped `Lab` (namespace + fake IMDS, optional mode); skips
                       when the lab cannot run here (not root, no iproute2).
    imds_lab_required  the same with token mode ``required`` for AWS and Alibaba.
    lab_factory        function-scoped factory: ``lab_factory(mode=..., modes=...)`` -> started
                       `Lab`, closed at the end of the test.

Set IMDS_TRACER_REQUIRE_LAB=1 to turn the skips into failures (CI on a capable machine).
"""
from __future__ import annotations

import os

import pytest

from tests.lab import netns
from tests.lab.fake_imds import FakeIMDS


def _need_lab() -> None:
    reason = netns.available()
    if reason:
        if os.environ.get("IMDS_TRACER_REQUIRE_LAB") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def fake_imds():
    srv = FakeIMDS(aliyun_addrs={"127.0.0.2"})
    srv.start([("127.0.0.1", 0), ("127.0.0.2", 0)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def imds_lab():
    _need_lab()
    with netns.Lab(mode="optional") as lab:
        yield lab


@pytest.fixture(scope="module")
def imds_lab_required():
    _need_lab()
    with netns.Lab(mode="required") as lab:
        yield lab


@pytest.fixture
def lab_factory():
    _need_lab()
    labs: list[netns.Lab] = []

    def make(**kw) -> netns.Lab:
        lab = netns.Lab(**kw)
        labs.append(lab)
        return lab.__enter__()

    yield make
    for lab in labs:
        lab.close()
