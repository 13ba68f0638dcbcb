"""Batch inference: a model over thousands of scans (``python -m med3dvlm.predict``).

* :mod:`~med3dvlm.predicting.inputs`: the volumes of ``inputs=`` (folder, list, glob) and the questions;
* :mod:`~med3dvlm.predicting.models`: the model of ``model_dir=`` (export, checkpoint, released folder)
  and its fingerprint;
* :mod:`~med3dvlm.predicting.data`: DataLoader workers read and preprocess volumes, bad ones become
  records; each rank's share of what ``out`` still lacks;
* :mod:`~med3dvlm.predicting.module`: the LightningModule (batched encoding and generation) and the
  callbacks writing each rank's shard and showing the progress;
* :mod:`~med3dvlm.predicting.outputs`: ``out`` and its companion files, the merge of the shards;
* :mod:`~med3dvlm.predicting.run`: one run, from the config to the summary.
"""
