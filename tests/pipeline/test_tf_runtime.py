"""pipeline/tf_runtime.py: the TensorFlow settings applied before TensorFlow starts."""

import logging
import sys

from pipeline import tf_runtime


def test_apply_cpu_env_fills_in_what_the_user_did_not_set(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    environ = {"TF_ENABLE_ONEDNN_OPTS": "1", "OTHER": "x"}
    effective = tf_runtime.apply_cpu_env(environ)
    assert effective == {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPU_ALLOCATOR_USE_BFC": "true"}
    assert environ == {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPU_ALLOCATOR_USE_BFC": "true",
                       "OTHER": "x"}
    assert tf_runtime.apply_cpu_env({}) == tf_runtime.TF_CPU_ENV


def test_apply_cpu_env_warns_when_tensorflow_is_already_loaded(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    with caplog.at_level(logging.WARNING, logger=tf_runtime.__name__):
        tf_runtime.apply_cpu_env({})
    assert "TensorFlow was imported before" in caplog.text
    monkeypatch.delitem(sys.modules, "tensorflow")
    caplog.clear()
    tf_runtime.apply_cpu_env({})
    assert caplog.text == ""
