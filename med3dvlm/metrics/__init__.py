"""The paper's metrics (SPEC §7), used alike by the training stages (validation and test) and by
the evaluation suites:

* :mod:`~med3dvlm.metrics.retrieval`: image-text retrieval recall at K;
* :mod:`~med3dvlm.metrics.vqa`: closed-ended VQA (the paper's rule, a strict accuracy) and the
  means per question type of any per-sample score;
* :mod:`~med3dvlm.metrics.text`: BLEU-1, ROUGE, METEOR and BERTScore of generated text.

Only the data layout is imported from the rest of the package; nothing here imports Lightning.
"""
