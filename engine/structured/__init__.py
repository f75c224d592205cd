"""Structured output: constraining a request's tokens to a JSON schema, a regex, a list of
choices or an EBNF grammar (xgrammar computes the token masks). ``spec`` is pure Python;
``grammar`` and ``book`` load xgrammar when first used."""
