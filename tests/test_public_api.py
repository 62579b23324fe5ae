"""Every name the README shows is reachable the way the README writes it, after `import mrl_kernels as mk`."""
import mrl_kernels as mk


def test_readme_names_are_attributes():
    for name in ("matryoshka_linear_cross_entropy", "matryoshka_contrastive_loss", "prefix_norms", "prefix_topk",
                 "rerank", "adaptive_search", "funnel_search", "MatryoshkaIndex", "__version__"):
        assert hasattr(mk, name), name
    assert callable(mk.datasets.synthetic_mrl_embeddings)
    assert callable(mk.reference.nested_cross_entropy)
    for name in ("MatryoshkaLinear", "MatryoshkaCrossEntropyLoss", "MatryoshkaLinearCrossEntropy",
                 "MatryoshkaContrastiveLoss"):
        assert hasattr(mk.nn, name), name
    assert set(mk.__all__) <= set(dir(mk))
