"""Policy files: typed schema, loader with file:line errors, matchers."""
