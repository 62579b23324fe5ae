"""Drop-ins for training libraries. Each submodule imports its library only when used, so the package
imports without them: ``mrl_kernels.integrations.sentence_transformers`` needs the ``st`` extra
(``pip install "mrl-kernels[st]"``)."""
