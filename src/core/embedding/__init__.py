"""Embedding: the local and OpenAI embedders, the vectors they share, and which one an
event uses. (openai is imported only when an event uses it.)"""
