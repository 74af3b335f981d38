"""Evaluation: answers scored against gold ones (`generate`, `scoring`) and retrieval
ranked against labelled relevant documents (`retrieval`)."""
