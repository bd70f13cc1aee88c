"""The demo model built once into the real cache (the first test run builds it, ~2-3 minutes)."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from servegen.demo_model import build_demo_model


@pytest.fixture(scope="session")
def demo_model_dir():
    return build_demo_model()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="session")
def demo_model(demo_model_dir):
    return AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
