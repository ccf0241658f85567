Feature: OpenAI-compatible chat completions
  POST /v1/chat/completions is a task of the same queue. Streamed, it speaks OpenAI's wire:
  data lines of chat.completion.chunk objects, then data: [DONE].

  Background:
    Given a HOME stack with the pools:
      | pool | slots | model | ctx  |
      | p0   | 1     | tiny  | 2048 |

  @OAI-7101
  Scenario: A streamed chat completion sends chunks and ends with [DONE]
    When a client streams a chat completion of "Say hello" with max_tokens 8
    Then the answer is 200 with content type "text/event-stream"
    And every line is a data line or a comment, and the last one is "data: [DONE]"
    And every chunk is a "chat.completion.chunk" of model "tiny" named after the task
    And exactly one chunk has a finish reason
    And no chunk carries usage, which nobody asked for
    And the task of the chat completion completed on pool "p0"

  @OAI-7103
  Scenario: A chat completion without a token is refused in OpenAI's error shape
    When a request without a token posts a chat completion
    Then the answer is 401 with an OpenAI error object
