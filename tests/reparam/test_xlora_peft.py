"""X-LoRA parity with PEFT's ``xlora`` on a tiny transformers LLaMA (the compare extra):
the same base, the same two LoRA experts (read with ``from_peft``) and the same classifier give
the same logits, for shared and layer-wise scalings and for top-k with re-softmax."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax import reparam as R

torch = pytest.importorskip("torch", reason="PEFT parity needs torch: pip install '.[compare]'")
transformers = pytest.importorskip("transformers", reason="needs transformers: '.[compare]'")
peft = pytest.importorskip("peft", reason="PEFT parity needs peft: pip install '.[compare]'")

from lowrank_jax.models import load_hf  # noqa: E402

HIDDEN = 32


def module_name(path, index=()):
    """Our ``layers/0/attn/q_proj/kernel`` is HF's ``model.layers.0.self_attn.q_proj``."""
    return "model." + path.rsplit("/", 1)[0].replace("/", ".").replace("attn", "self_attn")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("xlora")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    for k, r in enumerate((2, 4)):
        base = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        lora = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                               task_type="CAUSAL_LM")  # fmt: skip
        model = peft.get_peft_model(base, lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.3)
        model.save_pretrained(root / f"expert{k}")
    return root


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layerwise_scalings": True, "softmax_temperature": 0.7},
        {"top_k_lora": 1, "enable_softmax": False, "enable_softmax_topk": True},
    ],
)
def test_logits_match_peft_xlora(checkpoint, options):
    config = peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=HIDDEN, xlora_depth=1,
        adapters={str(k): str(checkpoint / f"expert{k}") for k in range(2)}, **options,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM.from_pretrained(checkpoint / "base", use_cache=False)
    reference = peft.get_peft_model(base, config).eval()
    classifier = reference.base_model.internal_xlora_classifier.layers[-1]
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.5)
        classifier.bias.normal_(0.0, 0.5)
    tokens = np.random.default_rng(0).integers(0, 61, size=(2, 9))
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(tokens)).logits.numpy()

    model = load_hf(str(checkpoint / "base"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    experts = [
        R.from_peft(str(checkpoint / f"expert{k}"), params, module_name=module_name)
        for k in range(2)
    ]
    routing = R.xlora(2, top_k=options.get("top_k_lora"),
                      softmax_topk=options.get("enable_softmax_topk", False))  # fmt: skip
    wrapped = R.wrap_experts(model, routing, experts=experts)
    ours = R.XLoRA(
        wrapped, hidden_size=HIDDEN, layerwise=options.get("layerwise_scalings", False),
        softmax=options.get("enable_softmax", True),
        temperature=options.get("softmax_temperature", 1.0), rngs=nnx.Rngs(0),
    )  # fmt: skip
    # PEFT numbers its layers in module order (q_proj, v_proj per block); ours are sorted by
    # path, which is the same order here.
    assert [n.path for n in R.routed_layers(wrapped)] == [
        f"layers/{i}/attn/{p}_proj/kernel" for i in range(2) for p in "qv"
    ]
    ours.head[0].kernel[...] = jnp.asarray(classifier.weight.detach().numpy().T)
    ours.head[0].bias[...] = jnp.asarray(classifier.bias.detach().numpy())
    got = nnx.jit(lambda m, t: m(t))(ours, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(got, want, atol=1e-5)
