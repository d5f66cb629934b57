"""Facts carried across graphs: layouts proven on the whole model (``prepare()``), declared by
the user at the model's edge (``ImageTokens``), marked into graphs, and handed across DDP splits."""
