"""Graph IR helpers shared by every stage: the values nodes carry, canonical op names, the op
catalogue (what each op does to token axes), module paths, and graph copying / insertion."""
