Feature: Handoff files from any engine provisioner
  In the HOME profile orchestratord learns pools from the handoff files in its runtime
  directory, whoever wrote them. Here orchestratord runs alone and the suite starts a
  llama-server of its own, as an external provisioner would.

  Background:
    Given orchestratord alone on an empty runtime directory, beside a llama-server of our own

  @POOL-3203 @OBS-6110
  Scenario: A handoff file makes its pool ready, and deleting it retires the pool
    Given orchestratord is not ready
    When a handoff file for pool "ext" naming that llama-server is written
    Then orchestratord lists pool "ext" as ready within 2 seconds
    And "/ready" answers 200 without a token
    And a task of 8 tokens completes on pool "ext"
    When the handoff file of pool "ext" is deleted
    Then orchestratord no longer lists pool "ext" within 2 seconds
    And "/ready" answers 503 without a token

  @POOL-3204
  Scenario: An invalid handoff file changes nothing and the others still count
    When an invalid handoff file for pool "broken" is written
    And a handoff file for pool "good" naming that llama-server is written
    Then orchestratord lists pool "good" as ready within 2 seconds
    And orchestratord does not list pool "broken"
    And orchestratord logged the invalid handoff file of pool "broken"
    And "/health" answers 200 without a token
