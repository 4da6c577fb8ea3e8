"""Tasks: one LightningModule loop, specialised per setting by how a batch feeds a model."""
