"""Speculative decoding: cheap guesses of a request's next tokens, checked by the model.

A proposer guesses up to K tokens per running request (ngram.py: the continuation of
the latest earlier occurrence of the sequence's last n tokens); the scheduler gives
the request 1 + K decode rows in one step; the sampler checks the guesses row by row
(sample/speculative.py) and keeps the longest run it would have drawn anyway, plus
its own next token. The `Speculator` (speculator.py) decides how many tokens each
request may guess, turning speculation down where guesses keep failing.
"""
