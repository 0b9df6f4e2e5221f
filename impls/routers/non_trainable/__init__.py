"""Non-trainable token choice (survey: Non-trainable Token-Choice): hashing, random draws and metadata.

No gate is learned: a token's experts follow from its token id, a random draw, or a label the caller
supplies (domain, task, language, token attribute), given to the router as an explicit input.
"""
