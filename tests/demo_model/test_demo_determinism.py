from safetensors.torch import save

from servegen.demo_model import Recipe
from servegen.demo_model.train import build_tokenizer, new_model, train


def test_training_is_bit_for_bit_repeatable():
    recipe = Recipe()
    tokenizers = [build_tokenizer(recipe) for _ in range(2)]
    assert tokenizers[0].backend_tokenizer.to_str() == tokenizers[1].backend_tokenizer.to_str()
    runs = [save(train(tok, recipe, log=lambda _: None, stop_after=20).state_dict()) for tok in tokenizers]
    assert runs[0] == runs[1]
    # ... and the 20 steps did train: the weights moved from the seeded start.
    assert save(new_model(tokenizers[0], recipe).state_dict()) != runs[0]
