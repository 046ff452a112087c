"""The package's layers import only the layers below them, and no module grows past the limit."""

import import_graph


def test_each_layer_imports_only_the_layers_below_it(capsys):
    assert import_graph.main() == 0, capsys.readouterr().out
